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
    yield f"http://127.0.0.1:{port}/", app, demo
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def top_label(result) -> str:
    label = result[0] if isinstance(result, tuple) else result  # (label, heat map) from /predict
    return label["label"] if isinstance(label, dict) else label


def test_upload_gets_a_label_from_the_vocab_and_a_heat_map(client, server):
    import numpy as np
    from gradio_client import handle_file
    from PIL import Image

    from cifar_fastai.evaluation.cam import DISPLAY_SIZE

    clf = server[1].clf
    for example in sorted((REPO / "demo" / "examples").glob("*.*"))[:2]:
        res, heat = client.predict(handle_file(str(example)), api_name="/predict")
        expected = clf.predict(example)  # the page shows the model's own top 3 for the file
        assert top_label(res) == next(iter(expected))
        assert [c["label"] for c in res["confidences"]] == list(expected)
        assert [c["confidence"] for c in res["confidences"]] == pytest.approx(list(expected.values()), abs=1e-6)
        shown = np.asarray(Image.open(heat).convert("RGB"))
        assert shown.shape == (DISPLAY_SIZE, DISPLAY_SIZE, 3) and shown.std() > 10, "the Grad-CAM overlay"


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


def test_oversized_upload_is_refused_and_the_server_keeps_serving(client, server, tmp_path, monkeypatch):
    from gradio_client import handle_file

    from cifar_fastai.data.images import MAX_FILE_BYTES

    clf, calls = server[1].clf, []
    predict = clf.predict
    monkeypatch.setattr(clf, "predict", lambda img, **kw: calls.append(img) or predict(img, **kw))
    huge = tmp_path / "huge.jpg"
    huge.write_bytes(b"\xff\xd8" + b"\0" * (MAX_FILE_BYTES + 1))
    with pytest.raises(Exception, match="(?i)too large|size|limit|413"):
        client.predict(handle_file(str(huge)), api_name="/predict")
    assert calls == [], "refused by the server's upload limit, before the model's code sees the file"
    good = next((REPO / "demo" / "examples").glob("*.jpg"))
    assert top_label(client.predict(handle_file(str(good)), api_name="/predict"))
    assert len(calls) == 1


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


def shown_heatmap(driver) -> int | None:
    """The width of the loaded heat-map image on the page (its file's, not its box's), or None when none is shown."""
    return driver.execute_script(
        "const im = document.querySelector('#heatmap img');"
        "return im && im.complete && im.naturalWidth ? im.naturalWidth : null;"
    )


@needs_browser
def test_browser_upload_shows_the_prediction(server, browser, tmp_path):
    """Headless Chromium opens the page, uploads a CIFAR-10 test image, and reads the predicted label."""
    from selenium.webdriver.support.ui import WebDriverWait

    from cifar_fastai.evaluation.cam import DISPLAY_SIZE

    vocab = server[1].clf.vocab
    upload(browser, REPO / "demo" / "examples" / "ship.jpg")
    label = WebDriverWait(browser, 60).until(lambda d: shown_label(d, vocab))
    assert label in vocab
    assert WebDriverWait(browser, 30).until(shown_heatmap) == DISPLAY_SIZE, "the Grad-CAM overlay beside the label"
    time.sleep(0.5)  # let the confidence bars finish drawing before the screenshot
    shot = tmp_path / "demo.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    print(f"screenshot: {shot}")


@needs_browser
def test_browser_replacing_an_image_runs_the_model_once_and_an_error_clears_the_label(
    server, browser, tmp_path, monkeypatch
):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    app = server[1]
    calls = []
    predict = app.clf.predict
    monkeypatch.setattr(app.clf, "predict", lambda img, **kw: calls.append(img) or predict(img, **kw))
    vocab, wait = app.clf.vocab, WebDriverWait(browser, 60)
    # a late second run would need a second trigger, which the wiring test below rules out: the counts need no sleep
    upload(browser, REPO / "demo" / "examples" / "ship.jpg")
    wait.until(lambda d: shown_label(d, vocab))
    assert len(calls) == 1, calls
    upload(browser, REPO / "demo" / "examples" / "cat.jpg")  # a new upload replaces the shown image
    wait.until(lambda d: len(calls) >= 2 and shown_label(d, vocab))
    assert len(calls) == 2, f"one prediction per upload, not {len(calls) - 1} for the second"
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"a text file with an image's name")
    upload(browser, bad)
    wait.until(lambda d: "not an image" in d.find_element(By.TAG_NAME, "body").text)
    # the previous prediction and its heat map are not left beside the error (bounded: fails on the wait's timeout)
    wait.until(lambda d: shown_label(d, vocab) is None and shown_heatmap(d) is None)
    assert browser.find_element(By.TAG_NAME, "body").text.count("not an image") == 1, "the error is shown once"
    assert len(calls) == 3, "the bad file went to the model's own decoder once"
    browser.find_elements(By.CSS_SELECTOR, "button.gallery-item")[0].click()  # an example image
    wait.until(lambda d: shown_label(d, vocab))
    assert wait.until(shown_heatmap), "an example gets its heat map too"
    assert len(calls) == 4, "a clicked example is predicted once"


def test_the_page_runs_the_model_once_per_upload_or_example_click(server):
    """The page's event wiring: the model runs on `input` (the user's upload, paste or clear), not on `change`, which
    also fires when the page sets the image itself and would run it again; a failure clears the label and heat map;
    an example click loads the example into the image box, then runs the model once."""
    demo = server[2]
    deps = demo.config["dependencies"]
    ids = {c["props"]["elem_id"]: c["id"] for c in demo.config["components"] if c.get("props", {}).get("elem_id")}
    image, outputs = ids["input-image"], [ids["prediction"], ids["heatmap"]]
    on_image = [d for d in deps if any(t[0] == image for t in d["targets"])]
    assert [[tuple(t) for t in d["targets"]] for d in on_image] == [[(image, "input")]]
    predicted = on_image[0]
    assert predicted["outputs"] == outputs and predicted["api_name"] == "predict"
    after = [d for d in deps if d["trigger_after"] == predicted["id"]]
    assert len(after) == 1 and after[0]["trigger_only_on_failure"] and after[0]["outputs"] == outputs
    clicks = [d for d in deps if any(t[1] == "click" for t in d["targets"])]
    assert len(clicks) == 1 and clicks[0]["outputs"] == [image]
    then = [d for d in deps if d["trigger_after"] == clicks[0]["id"]]
    assert len(then) == 1 and then[0]["outputs"] == outputs
    assert demo.fns[then[0]["id"]].fn is demo.fns[predicted["id"]].fn, "the same classify as an upload"


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


ERRORS = {"truncated", "empty", "text", "svg"}  # the rest are pictures, however odd


@pytest.fixture(scope="module")
def api_learn(tiny_run):
    from cifar_fastai import load_model

    return load_model(tiny_run)


@pytest.mark.parametrize("kind", ODD_FILES)
def test_python_api_and_running_demo_agree_on_odd_files(kind, odd_files, client, api_learn):
    """`load_model(run).predict(path)` prepares a file exactly as the demo does: same label, or the same message."""
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    from cifar_fastai.errors import ImageInputError

    path, learn = odd_files[kind], api_learn
    try:
        api, api_error = str(learn.predict(path)[0]), None
    except ImageInputError as e:
        api, api_error = None, str(e)
    try:
        demo, demo_error = top_label(client.predict(handle_file(str(path)), api_name="/predict")), None
    except AppError as e:  # carries the page's message
        demo, demo_error = None, str(e)
    assert (api_error is not None) == (kind in ERRORS), (kind, api_error)
    if api_error is None:
        assert demo_error is None and api == demo, (api, demo, demo_error)
    else:
        assert path.name in api_error, "the message names the file"
        assert demo_error is not None and api_error.split(": ", 1)[1] in demo_error, (api_error, demo_error)
