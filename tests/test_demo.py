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


needs_browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER), reason="needs Debian's chromium + chromium-driver (.ci/run installs them)"
)


@pytest.fixture
def browser(server):
    """Headless Chromium on the demo page."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--window-size=1200,900"):  # fmt: skip
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    driver.get(server[0])
    yield driver
    driver.quit()


def upload(driver, path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    field = WebDriverWait(driver, 60).until(
        EC.presence_of_element_located((By.CSS_SELECTOR, "#input-image input[type=file]"))
    )
    field.send_keys(str(path))


def shown_label(driver, vocab) -> str | None:
    from selenium.webdriver.common.by import By

    text = driver.find_element(By.ID, "prediction").text
    return next((line for line in text.splitlines() if line.strip() in vocab), None)


@needs_browser
def test_browser_upload_shows_the_prediction(server, browser, tmp_path):
    """Headless Chromium opens the page, uploads a CIFAR-10 test image, and reads the predicted label."""
    from selenium.webdriver.support.ui import WebDriverWait

    vocab = server[1].clf.vocab
    upload(browser, REPO / "demo" / "examples" / "ship.jpg")
    label = WebDriverWait(browser, 60).until(lambda d: shown_label(d, vocab))
    assert label in vocab
    time.sleep(0.5)  # let the confidence bars finish drawing before the screenshot
    shot = tmp_path / "demo.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


@needs_browser
def test_browser_replacing_an_image_runs_the_model_once_and_an_error_clears_the_label(server, browser, tmp_path, monkeypatch):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = server[1]
    calls = []
    predict = app.clf.predict
    monkeypatch.setattr(app.clf, "predict", lambda img, **kw: calls.append(img) or predict(img, **kw))
    vocab, wait = app.clf.vocab, WebDriverWait(browser, 60)
    upload(browser, REPO / "demo" / "examples" / "ship.jpg")
    wait.until(lambda d: shown_label(d, vocab))
    time.sleep(1.0)
    assert len(calls) == 1, calls
    upload(browser, REPO / "demo" / "examples" / "cat.jpg")  # a new upload replaces the shown image
    wait.until(lambda d: len(calls) >= 2 and shown_label(d, vocab))
    time.sleep(1.0)
    assert len(calls) == 2, f"one prediction per upload, not {len(calls) - 1} for the second"
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"a text file with an image's name")
    upload(browser, bad)
    wait.until(lambda d: "not an image" in d.find_element(By.TAG_NAME, "body").text)
    time.sleep(1.0)
    assert shown_label(browser, vocab) is None, "the previous prediction is not left beside the error"
    assert browser.find_element(By.TAG_NAME, "body").text.count("not an image") == 1, "the error is shown once"
    n = len(calls)
    browser.find_elements(By.CSS_SELECTOR, "button.gallery-item")[0].click()  # an example image
    wait.until(lambda d: shown_label(d, vocab))
    time.sleep(1.0)
    assert len(calls) == n + 1, "a clicked example is predicted once"


ODD_FILES = ["large-jpeg", "grayscale", "16-bit-png", "cmyk-jpeg", "rgba-png", "palette-png-transparent", "webp",
             "animated-gif-first-frame", "1px", "extreme-aspect", "truncated", "empty", "text", "svg"]  # fmt: skip


@pytest.fixture(scope="module")
def odd_files(tmp_path_factory):
    import io

    from PIL import Image

    from tests.test_serve import odd_images

    folder = tmp_path_factory.mktemp("odd_files")
    files = {k: path for k, (path, _) in odd_images(folder).items()}
    Image.new("RGB", (1, 1), (200, 30, 30)).save(files.setdefault("1px", folder / "one.png"))
    Image.new("RGB", (2000, 20), (30, 30, 200)).save(files.setdefault("extreme-aspect", folder / "strip.png"))
    buf = io.BytesIO()
    Image.effect_noise((256, 256), 60).convert("RGB").save(buf, "JPEG")
    (files.setdefault("truncated", folder / "cut.jpg")).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (files.setdefault("empty", folder / "empty.png")).write_bytes(b"")
    (files.setdefault("text", folder / "notes.jpg")).write_bytes(b"a text file with an image's name")
    (files.setdefault("svg", folder / "drawing.svg")).write_text('<svg xmlns="http://www.w3.org/2000/svg"/>')
    return files


@pytest.mark.parametrize("kind", ODD_FILES)
def test_python_api_and_running_demo_agree_on_odd_files(kind, odd_files, client, tiny_run):
    """`load_model(run).predict(path)` prepares a file exactly as the demo does: same label, or the same message."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from cifar_fastai import load_model
    from cifar_fastai.errors import ImageInputError

    path = odd_files[kind]
    learn = load_model(tiny_run)
    try:
        api, api_error = str(learn.predict(path)[0]), None
    except ImageInputError as e:
        api, api_error = None, str(e)
    try:
        demo, demo_error = top_label(client.predict(handle_file(str(path)), api_name="/predict")), None
    except AppError as e:  # carries the page's message
        demo, demo_error = None, str(e)
    if api_error is None:
        assert demo_error is None and api == demo, (api, demo, demo_error)
    else:
        assert path.name in api_error, "the message names the file"
        assert demo_error is not None and api_error.split(": ", 1)[1] in demo_error, (api_error, demo_error)
