"""The Gradio demo as a user meets it: a real server on a free local port, driven by gradio_client and by Chromium."""

from __future__ import annotations

import importlib.util
import shutil
import socket
import time

import pytest

from tests.conftest import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_app():
    spec = importlib.util.spec_from_file_location("demo_app", REPO / "demo" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)  # importing builds nothing and launches nothing
    return app


@pytest.fixture(scope="module")
def server(tiny_run):
    """The demo app serving the tiny run's safe model, as `python demo/app.py --model <run>` would."""
    from cifar_fastai.deploy.serve import serve

    app = load_app()
    assert app.clf is None  # importing the app loaded no model
    demo = app.make_demo(tiny_run)
    port = free_port()
    serve(demo, port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/", app
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def top_label(result) -> str:
    return result["label"] if isinstance(result, dict) else result


def test_upload_gets_a_label_from_the_vocab(client, server):
    from gradio_client import handle_file

    vocab = server[1].clf.vocab
    for example in sorted((REPO / "demo" / "examples").glob("*.*"))[:2]:
        res = client.predict(handle_file(str(example)), api_name="/predict")
        assert top_label(res) in vocab
        assert len(res["confidences"]) == 3 and all(c["label"] in vocab for c in res["confidences"])


def test_bad_file_gives_an_error_and_the_server_keeps_serving(client, tmp_path):
    from gradio_client import handle_file

    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"this is a text file with a .jpg name")
    with pytest.raises(Exception, match="not an image"):
        client.predict(handle_file(str(bad)), api_name="/predict")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(Exception, match="empty"):
        client.predict(handle_file(str(empty)), api_name="/predict")
    good = next((REPO / "demo" / "examples").glob("*.jpg"))
    assert top_label(client.predict(handle_file(str(good)), api_name="/predict"))


def test_oversized_upload_is_refused_and_the_server_keeps_serving(client, tmp_path):
    from gradio_client import handle_file

    from cifar_fastai.data.images import MAX_FILE_BYTES

    huge = tmp_path / "huge.jpg"
    huge.write_bytes(b"\xff\xd8" + b"\0" * (MAX_FILE_BYTES + 1))
    with pytest.raises(Exception, match="(?i)too large|size|limit|413"):
        client.predict(handle_file(str(huge)), api_name="/predict")
    good = next((REPO / "demo" / "examples").glob("*.jpg"))
    assert top_label(client.predict(handle_file(str(good)), api_name="/predict"))


def run_app(*args: str):
    """`python demo/app.py ARGS` in-process (typer's CliRunner), for the cases that stop before launching."""
    import typer
    from typer.testing import CliRunner

    cli = typer.Typer()
    cli.command()(load_app().main)
    return CliRunner().invoke(cli, list(args))


def test_app_refuses_a_pickle_without_trust(tiny_run):
    r = run_app("--model", str(tiny_run / "export.pkl"))
    assert r.exit_code != 0 and "--trust-pickle" in r.output and r.exception.__class__.__name__ == "SystemExit"


def test_app_without_a_model_says_how_to_make_one(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run_app()
    assert r.exit_code != 0 and "scripts/train.py" in r.output and r.exception.__class__.__name__ == "SystemExit"


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium + chromium-driver (.ci/run installs them)")
def test_browser_upload_shows_the_prediction(server, tmp_path):
    """Headless Chromium opens the page, uploads a CIFAR-10 test image, and reads the predicted label."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1200,900"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        url, app = server
        driver.get(url)
        wait = WebDriverWait(driver, 60)
        upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#input-image input[type=file]")))
        upload.send_keys(str(REPO / "demo" / "examples" / "ship.jpg"))
        vocab = app.clf.vocab

        def shown_label(d):
            text = d.find_element(By.ID, "prediction").text
            return next((line for line in text.splitlines() if line.strip() in vocab), None)

        label = wait.until(shown_label)
        assert label in vocab
        time.sleep(0.5)  # let the confidence bars finish drawing before the screenshot
        shot = tmp_path / "demo.png"
        driver.save_screenshot(str(shot))
        assert shot.stat().st_size > 10_000
        print(f"screenshot: {shot}")
    finally:
        driver.quit()
