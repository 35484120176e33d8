"""The playground in a real browser against a real server (demo model, API key set): load, key
kept in localStorage, a refused request without the key, a streamed answer with its numbers, the
kept-token overlay, compare mode, and an error for a bad image.

Set LIGHTVLM_UI_SCREENSHOT=docs/playground.png to also save the screenshot the README shows."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("selenium")
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
WAIT_S = 120  # CI runners are slow: a prefill can wait behind the other tests' work


def wait_for(driver, condition, what: str):  # noqa: ANN001, ANN201
    return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(lambda d: condition(d), message=what)


def cards(driver) -> list:  # noqa: ANN001
    return driver.find_elements(By.CSS_SELECTOR, "#results .result")


def finished(card) -> bool:  # noqa: ANN001
    return card.find_element(By.CSS_SELECTOR, '[data-stat="finish_reason"]').text not in ("", "–")


def record_answer_updates(driver) -> None:  # noqa: ANN001
    """Count the DOM updates of every answer, to tell a streamed answer from one set at once."""
    driver.execute_script("""
        window.answerUpdates = 0;
        new MutationObserver((records) => {
          for (const r of records) {
            const el = r.target.nodeType === 1 ? r.target : r.target.parentElement;
            if (el && el.closest('.answer')) window.answerUpdates++;
          }
        }).observe(document.getElementById('results'), {subtree: true, childList: true, characterData: true});
    """)


def send(driver) -> None:  # noqa: ANN001
    driver.find_element(By.ID, "send").click()


@pytest.fixture
def page(browser, server):  # noqa: ANN001, ANN201
    browser.get(server + "/")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#samples img")) == 4, "samples shown")
    wait_for(browser, lambda d: d.find_element(By.ID, "model").text == "model shapes-demo", "model shown")
    return browser


def set_key(driver, key: str) -> None:  # noqa: ANN001
    field = driver.find_element(By.ID, "api-key")
    field.clear()
    if key:
        field.send_keys(key)


def test_key_is_needed_and_remembered(page, api_key: str) -> None:  # noqa: ANN001
    set_key(page, "")
    page.find_element(By.CSS_SELECTOR, '#samples img[data-sample="scene-1"]').click()
    send(page)
    error = wait_for(page, lambda d: d.find_element(By.ID, "error").text, "401 shown")
    assert error.startswith("401 unauthorized")
    set_key(page, api_key)
    page.refresh()
    wait_for(page, lambda d: d.find_element(By.ID, "api-key").get_attribute("value") == api_key, "key kept")


def test_sample_question_streams_answer_with_numbers_and_overlay(page, api_key: str) -> None:  # noqa: ANN001
    set_key(page, api_key)
    page.find_element(By.CSS_SELECTOR, '#samples img[data-sample="scene-4"]').click()
    Select(page.find_element(By.ID, "question")).select_by_value("Describe the image.")
    assert page.find_element(By.ID, "prompt").get_attribute("value") == "Describe the image."
    Select(page.find_element(By.ID, "preset")).select_by_value("balanced")
    record_answer_updates(page)
    send(page)
    card = wait_for(page, lambda d: cards(d) and finished(cards(d)[0]) and cards(d)[0], "answer finished")
    assert page.find_element(By.ID, "error").get_attribute("hidden") is not None, page.find_element(By.ID, "error").text
    answer = card.find_element(By.CSS_SELECTOR, ".answer").text
    assert answer == "purple triangle, yellow square and blue circle"  # examples/questions.json, scene 4
    assert page.execute_script("return window.answerUpdates") > 3, "the answer arrived in one piece"
    stat = {el.get_attribute("data-stat"): el.text for el in card.find_elements(By.CSS_SELECTOR, "[data-stat]")}
    assert stat["prefill_ms"].endswith(" ms") and float(stat["prefill_ms"].split()[0]) > 0
    assert stat["ttft_ms"].endswith(" ms") and stat["finish_reason"] == "stop"
    kept, of_total = stat["kept"].split(" of ")
    assert 0 < int(kept) < int(of_total) == 256
    assert stat["kv_cache_bytes"].endswith("KiB") or stat["kv_cache_bytes"].endswith("MiB")
    canvas = card.find_element(By.CSS_SELECTOR, ".overlay canvas")
    assert canvas.is_displayed()
    cells, kept_cells = int(canvas.get_attribute("data-cells")), int(canvas.get_attribute("data-kept"))
    assert cells == 256 and 0 < kept_cells < cells
    assert "kept" in card.find_element(By.CSS_SELECTOR, ".stage-label").text
    shaded = page.execute_script(
        "const c = arguments[0]; const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) if (d[i] > 0) n++; return n / (d.length / 4);",
        canvas,
    )
    assert 0.3 < shaded < 1.0, "the overlay should shade the dropped cells"


def test_compare_mode_runs_none_beside_the_preset(page, api_key: str) -> None:  # noqa: ANN001
    set_key(page, api_key)
    page.find_element(By.CSS_SELECTOR, '#samples img[data-sample="scene-3"]').click()
    Select(page.find_element(By.ID, "preset")).select_by_value("aggressive")
    page.find_element(By.ID, "compare").click()
    send(page)
    wait_for(page, lambda d: len(cards(d)) == 2 and all(finished(c) for c in cards(d)), "both answers")
    by_preset = {c.get_attribute("data-preset"): c for c in cards(page)}
    assert set(by_preset) == {"none", "aggressive"}
    kept = {p: c.find_element(By.CSS_SELECTOR, '[data-stat="kept"]').text for p, c in by_preset.items()}
    assert kept["none"] == "256 of 256"
    assert int(kept["aggressive"].split(" of ")[0]) < 256
    for card in by_preset.values():
        assert card.find_element(By.CSS_SELECTOR, ".answer").text.strip()
    screenshot = os.environ.get("LIGHTVLM_UI_SCREENSHOT")
    if screenshot:
        page.execute_script("window.scrollTo(0, 0)")
        page.save_screenshot(str(ROOT / screenshot))


def test_bad_image_shows_an_error(page, api_key: str, tmp_path: Path) -> None:  # noqa: ANN001
    set_key(page, api_key)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a picture" * 20)
    file_input = page.find_element(By.ID, "file")
    page.execute_script("arguments[0].hidden = false;", file_input)
    file_input.send_keys(str(bad))
    preview = page.find_element(By.ID, "preview")
    wait_for(page, lambda d: (preview.get_attribute("src") or "").startswith("data:"), "image loaded")
    send(page)
    error = wait_for(page, lambda d: d.find_element(By.ID, "error").text, "error shown")
    assert error.startswith("400 invalid_image"), error
    assert not cards(page)[0].find_element(By.CSS_SELECTOR, ".answer").text
