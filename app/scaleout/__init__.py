"""Scale-out on Ray Serve: the same FastAPI app (`app.main.create_app`) as a Ray Serve deployment.

`deployment.build_app` is the application builder (for `lightvlm serve --ray` and for Ray's own
`serve run` / `serve deploy` with deploy/ray/serve.yaml); `launcher.run_ray_serve` starts it.
Needs the optional extra: `pip install 'lightvlm-serve[ray]'`.
"""
