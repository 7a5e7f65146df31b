#!/usr/bin/env python3
"""Drives the operator's page in a real headless Chromium over the DevTools protocol
(through --remote-debugging-pipe: JSON messages ended by NUL on fds 3 and 4, so nothing
beyond the standard library is needed).

usage: ui.py CHROMIUM OPEN_BASE KEYED_BASE INSPECT_KEY SAMPLES_DIR SHOTS_DIR

OPEN_BASE serves without keys; KEYED_BASE asks for keys and INSPECT_KEY is an
inspect-role key there. Each step waits for a condition in the page (with a deadline)
and fails with a screenshot of the page as it was. Screenshots of every page are saved
in SHOTS_DIR and checked not to be blank.
"""

import base64
import json
import os
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib

CHROMIUM, OPEN_BASE, KEYED_BASE, INSPECT_KEY, SAMPLES, SHOTS = sys.argv[1:7]


class Browser:
    def __init__(self, path):
        cmd_r, self.cmd_w = os.pipe()
        self.res_r, res_w = os.pipe()
        # Chromium reads commands on fd 3 and writes replies on fd 4: the pipes' child
        # ends pass as 100 and 101 and a shell places them.
        hi_r, hi_w = 100, 101
        os.dup2(cmd_r, hi_r)
        os.dup2(res_w, hi_w)
        args = [path, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--remote-debugging-pipe", f"--user-data-dir={tempfile.mkdtemp()}", "about:blank"]
        self.proc = subprocess.Popen(
            ["bash", "-c", 'exec "$@" 3<&100 4>&101 100<&- 101>&-', "chromium", *args],
            pass_fds=(hi_r, hi_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for fd in (cmd_r, res_w, hi_r, hi_w):
            os.close(fd)
        self.buf = b""
        self.next_id = 0
        self.session = None

    def call(self, method, session=True, **params):
        self.next_id += 1
        msg = {"id": self.next_id, "method": method, "params": params}
        if session and self.session:
            msg["sessionId"] = self.session
        os.write(self.cmd_w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self.buf:
                chunk = os.read(self.res_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed the DevTools pipe")
                self.buf += chunk
            raw, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def open_page(self):
        target = self.call("Target.createTarget", session=False, url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", session=False, targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")
        # The smallest screen the page is meant for.
        self.call("Emulation.setDeviceMetricsOverride", width=1366, height=768, deviceScaleFactor=1, mobile=False)

    def js(self, expression):
        r = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"{expression}: {r['exceptionDetails']}")
        return r["result"].get("value")

    def goto(self, url):
        self.call("Page.navigate", url=url)

    def screenshot(self, name):
        data = base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"])
        path = os.path.join(SHOTS, f"{name}.png")
        with open(path, "wb") as f:
            f.write(data)
        return path, data

    def wait(self, what, expression, seconds=60):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                if self.js(expression):
                    return
            except RuntimeError:
                pass  # the page is between documents

            time.sleep(0.1)  # polling a condition with a deadline, not waiting for a guess
        path, _ = self.screenshot("failed")
        sys.exit(f"FAIL: {what} (not true within {seconds} s: {expression}); screenshot {path}")

    def key(self, key, code=None, text=None):
        for kind in ("keyDown", "keyUp"):
            params = {"type": kind, "key": key, "code": code or key}
            if text and kind == "keyDown":
                params["text"] = text
            self.call("Input.dispatchKeyEvent", **params)

    def click(self, selector):
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                      " return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)


def grey_png(width, height):
    """A PNG of a grey gradient, written with the standard library."""
    rows = b"".join(b"\x00" + bytes((x * 4 + y) % 256 for x in range(width)) for y in range(height))
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def grey_tiff(width, height):
    """An uncompressed 8-bit grey TIFF of the same gradient: a format vigil reads and
    browsers do not show."""
    pixels = bytes((x * 4 + y) % 256 for y in range(height) for x in range(width))
    entries = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, 0), (277, 3, 1, 1), (278, 3, 1, height), (279, 4, 1, len(pixels))]
    ifd_size = 2 + 12 * len(entries) + 4
    data_at = 8 + ifd_size
    ifd = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        value = data_at if tag == 273 else value
        ifd += struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
    return b"II*\x00" + struct.pack("<I", 8) + ifd + struct.pack("<I", 0) + pixels


def png_filtered_bytes(data):
    """The decompressed scanlines of a PNG, still filtered: flat areas filter to zeros."""
    pos, idat = 8, b""
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return zlib.decompress(idat)


def not_blank(b, name):
    """Saves a screenshot and checks the page drew something: a blank 1366×768 page
    measured 0.02% non-zero filtered bytes (4 distinct values), the sparsest page here
    (the home page) 1.1%."""
    path, data = b.screenshot(name)
    filtered = png_filtered_bytes(data)
    drawn = sum(1 for v in filtered if v) / len(filtered)
    if drawn < 0.003 or len(set(filtered)) < 32:
        sys.exit(f"FAIL: screenshot {path} looks blank ({100 * drawn:.2f}% drawn)")
    print(f"ok: {name} not blank ({path}, {100 * drawn:.1f}% drawn)")


def api(base, path, key=None):
    req = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {key}"} if key else {})
    with urllib.request.urlopen(req) as r:
        return json.load(r)


def check(what, condition):
    if not condition:
        sys.exit(f"FAIL: {what}")
    print(f"ok: {what}")


b = Browser(CHROMIUM)
try:
    b.open_page()
    samples = [os.path.abspath(os.path.join(SAMPLES, n)) for n in ("good_1.png", "hole_1.png")]

    # Inspect: pick two files, see verdicts, heatmaps and reconstructions load.
    b.goto(OPEN_BASE + "/#/inspect")
    b.wait("the model list loads", "document.querySelectorAll('#model-select option').length > 0")
    root = b.call("DOM.getDocument")["root"]["nodeId"]
    node = b.call("DOM.querySelector", nodeId=root, selector="#files")["nodeId"]
    b.call("DOM.setFileInputFiles", files=samples, nodeId=node)
    b.wait("both results arrive", "document.querySelectorAll('#results .result:not(.pending)').length === 2")
    check("no error on the inspect page", b.js("document.querySelectorAll('#results .error').length") == 0)
    b.wait("heatmaps and reconstructions load",
           "[...document.querySelectorAll('#results img')].length === 6 && "
           "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
    verdicts = b.js("[...document.querySelectorAll('#results .result')].map(r => "
                    "[r.querySelector('header b').textContent, r.querySelector('.verdict').textContent])")
    check(f"verdicts shown: {verdicts}", dict(verdicts) == {"hole_1.png": "anomalous", "good_1.png": "normal"})
    # The threshold slider re-judges without uploading again: at 0 every score is above it.
    b.js("(() => { const s = document.getElementById('threshold'); s.value = 0;"
         " s.dispatchEvent(new Event('input')); })()")
    check("threshold 0 re-judges both as anomalous",
          b.js("[...document.querySelectorAll('#results .verdict')].every(v => v.textContent === 'anomalous')"))
    check("a verdict at the slider's threshold says it is a preview",
          b.js("[...document.querySelectorAll('#results .score')].every(s => s.textContent.includes('preview at 0.000'))"))
    check("each heatmap has its legend with the pixel threshold",
          b.js("[...document.querySelectorAll('#results .legend')].filter(l => l.textContent.includes('pixel threshold 0.')).length") == 2)
    not_blank(b, "inspect")

    # Review: the list, an inspection, feedback by keyboard, moving with the arrows.
    b.goto(OPEN_BASE + "/#/review")
    b.wait("the list shows both", "document.querySelectorAll('#inspections .item').length === 2")
    b.wait("thumbnails load", "[...document.querySelectorAll('#inspections img')].every(i => i.complete && i.naturalWidth > 0)")
    not_blank(b, "review")
    ids = b.js("[...document.querySelectorAll('#inspections .item')].map(a => a.dataset.id)")
    b.click("#inspections .item")
    b.wait("the inspection page opens", f"document.getElementById('view').dataset.inspection === '{ids[0]}'")
    b.wait("its images load", "[...document.querySelectorAll('main img')].length === 3 && "
           "[...document.querySelectorAll('main img')].every(i => i.complete && i.naturalWidth > 0)")
    not_blank(b, "inspection")
    b.js("document.getElementById('note').value = 'scratch near the edge'")
    b.key("d", "KeyD", "d")
    b.wait("d labels it defective", "!!document.querySelector('#label .label.defective')")
    check("the note is stored with the label",
          api(OPEN_BASE, f"/v1/inspections/{ids[0]}").get("feedback_note") == "scratch near the edge")
    # A note edited after labelling is saved when the field changes.
    def note_becomes(text):
        # The label's text is cleared first, so "note saved" can only come from this save.
        b.js("(() => { document.getElementById('label').textContent = '';"
             " const n = document.getElementById('note'); n.value = " + json.dumps(text) + ";"
             " n.dispatchEvent(new Event('change')); })()")
        b.wait("the page says the note is saved", "document.querySelector('#label').textContent.includes('note saved')")
        check(f"the edited note {text!r} is stored",
              api(OPEN_BASE, f"/v1/inspections/{ids[0]}").get("feedback_note") == text)
    note_becomes("scratch, 2 mm")
    note_becomes("scratch near the edge")
    b.key("ArrowRight")
    b.wait("→ moves to the older one", f"document.getElementById('view').dataset.inspection === '{ids[1]}'")
    b.key("g", "KeyG", "g")
    b.wait("g labels it good", "!!document.querySelector('#label .label.good')")
    check("a label saved without a note shows no 'null'", "null" not in b.js("document.getElementById('label').textContent"))
    # Ctrl+D is the browser's bookmark key: it must not label the part defective.
    b.js("(() => { window.feedbackPosts = 0; const f = window.fetch; window.fetch = (...a) => {"
         " if (String(a[0]).includes('/feedback')) window.feedbackPosts++; return f(...a); }; })()")
    b.call("Input.dispatchKeyEvent", type="keyDown", key="d", code="KeyD", modifiers=2)
    b.call("Input.dispatchKeyEvent", type="keyUp", key="d", code="KeyD", modifiers=2)
    check("Ctrl+D sends no label", b.js("window.feedbackPosts") == 0)
    check("the labels are stored",
          [api(OPEN_BASE, f"/v1/inspections/{i}").get("feedback") for i in ids] == ["defective", "good"])
    b.key("ArrowLeft")
    b.wait("← moves back and shows the stored note",
           f"document.getElementById('view').dataset.inspection === '{ids[0]}' && "
           "document.getElementById('note').value === 'scratch near the edge'")
    b.goto(OPEN_BASE + "/#/review")
    b.wait("the list shows the labels",
           "document.querySelectorAll('#inspections .label.defective').length === 1 && "
           "document.querySelectorAll('#inspections .label.good').length === 1")
    # Filters live in the address: the address alone shows the same filtered list.
    b.js("(() => { const f = document.getElementById('filters'); f.verdict.value = 'anomalous'; f.requestSubmit(); })()")
    b.wait("the filter is in the address", "location.hash === '#/review?verdict=anomalous'")
    b.wait("the anomalous one is listed", "document.querySelectorAll('#inspections .item').length === 1")
    b.goto(OPEN_BASE + "/#/review")
    b.wait("without filters in the address, both", "document.querySelectorAll('#inspections .item').length === 2")
    b.goto(OPEN_BASE + "/#/review?verdict=anomalous")
    b.wait("the address alone sets the filter",
           "document.getElementById('filters') && document.getElementById('filters').verdict.value === 'anomalous' && "
           "document.querySelectorAll('#inspections .item').length === 1")

    # Models: the card with its loss curve and calibration; admin actions for an open server.
    b.goto(OPEN_BASE + "/#/models")
    b.wait("the model card shows its loss curve", "!!document.querySelector('.card.model svg.loss polyline')")
    b.wait("the feedback counts reach the card", "document.querySelector('.card.model').textContent.includes('2 labelled')")
    check("reload is offered without keys",
          b.js("getComputedStyle(document.querySelector('.card.model button.admin')).display") != "none")
    not_blank(b, "models")

    # Home: live numbers from the server itself.
    b.goto(OPEN_BASE + "/#/")
    b.wait("live numbers", "!!document.getElementById('live-table') && "
           "document.getElementById('live-table').textContent.includes('% of 2')")
    not_blank(b, "home")

    # Train a second model from the samples folder, watch it finish, inspect with it.
    b.goto(OPEN_BASE + "/#/train")
    b.wait("the training form", "!!document.getElementById('train-form')")
    for selector, text in (("input[name=model]", "from-samples"),
                           ("input[name=folder]", os.path.abspath(SAMPLES)),
                           ("input[name=steps]", "3")):
        b.js(f"document.querySelector('#train-form {selector}').focus()")
        b.call("Input.insertText", text=text)
    b.click("#train-form button[type=submit]")
    b.wait("the job is listed", "!!document.querySelector('#jobs tr[data-job]')")
    b.wait("the job succeeds, followed live", "document.querySelector('#jobs tr[data-job]').dataset.status === 'succeeded'",
           seconds=600)
    not_blank(b, "train")
    check("the new model is served", any(m["name"] == "from-samples" for m in api(OPEN_BASE, "/v1/models")))
    link = b.js("(document.querySelector('#jobs a.inspect-with') || {}).hash || ''")
    check(f"'inspect with it' names the new model: {link!r}", link == "#/inspect/from-samples")
    b.goto(OPEN_BASE + "/" + link)
    b.wait("the new model is offered and chosen",
           "document.getElementById('model-select') && document.getElementById('model-select').value === 'from-samples'")
    root = b.call("DOM.getDocument")["root"]["nodeId"]
    node = b.call("DOM.querySelector", nodeId=root, selector="#files")["nodeId"]
    b.call("DOM.setFileInputFiles", files=samples[:1], nodeId=node)
    # The first two results are still shown (kept across views), the new one on top.
    b.wait("the new model answers", "document.querySelectorAll('#results .result:not(.pending) .verdict').length === 3")
    check("the newest result names the new model",
          b.js("document.querySelector('#results .result .score').textContent.startsWith('from-samples')"))
    check("the earlier results keep their own model's verdicts",
          b.js("[...document.querySelectorAll('#results .result .score')].slice(1).every(s => s.textContent.startsWith('default') && !s.textContent.includes('preview'))"))
    check("no error inspecting with the new model", b.js("document.querySelectorAll('#results .error').length") == 0)
    # An image of another size than the model's training images: judged, with its warning.
    small = os.path.join(SHOTS, "small.png")
    with open(small, "wb") as f:
        f.write(grey_png(64, 48))
    b.call("DOM.setFileInputFiles", files=[small], nodeId=node)
    b.wait("the small image is judged", "document.querySelectorAll('#results .result:not(.pending) .verdict').length === 4")
    check("its result says it is of another size",
          b.js("[...document.querySelector('#results .result').querySelectorAll('.error')].some(e => e.textContent.includes('64×48 pixels; this model was trained on 256×256'))"))
    # The warning is stored with the record: its page shows it too.
    newest = api(OPEN_BASE, "/v1/inspections?limit=1")["items"][0]["id"]
    b.goto(OPEN_BASE + f"/#/inspections/{newest}")
    b.wait("the record's page shows the warning",
           f"document.getElementById('view').dataset.inspection === '{newest}' && "
           "[...document.querySelectorAll('main .warning')].some(e => e.textContent.includes('64×48 pixels'))")

    # A TIFF, which the browser cannot show: the page shows the server's PNG of it, on the
    # inspect page and on the record's.
    tiff = os.path.join(SHOTS, "part.tif")
    with open(tiff, "wb") as f:
        f.write(grey_tiff(256, 256))
    b.goto(OPEN_BASE + "/#/inspect")
    b.wait("the model list loads again", "document.querySelectorAll('#model-select option').length > 0")
    root = b.call("DOM.getDocument")["root"]["nodeId"]
    node = b.call("DOM.querySelector", nodeId=root, selector="#files")["nodeId"]
    b.call("DOM.setFileInputFiles", files=[tiff], nodeId=node)
    b.wait("the TIFF is judged and all its images show",
           "(() => { const r = [...document.querySelectorAll('#results .result')].find(r => r.textContent.includes('part.tif'));"
           " return r && !r.classList.contains('pending') && [...r.querySelectorAll('img')].length === 3 &&"
           " [...r.querySelectorAll('img')].every(i => i.complete && i.naturalWidth > 0); })()")
    check("no 'null' on the inspect page", "null" not in b.js("document.getElementById('results').textContent"))
    newest = api(OPEN_BASE, "/v1/inspections?limit=1")["items"][0]["id"]
    b.goto(OPEN_BASE + f"/#/inspections/{newest}")
    b.wait("the TIFF's record page shows its images",
           f"document.getElementById('view').dataset.inspection === '{newest}' && "
           "[...document.querySelectorAll('main img')].length === 3 && "
           "[...document.querySelectorAll('main img')].every(i => i.complete && i.naturalWidth > 0)")

    # A server with keys: the page asks once, and an inspect-role key sees no admin action.
    b.goto(KEYED_BASE + "/#/models")
    b.wait("the page asks for a key", "document.getElementById('key-dialog').open")
    b.js("document.getElementById('key-input').focus()")
    b.call("Input.insertText", text=INSPECT_KEY)
    b.key("Enter", "Enter", "\r")
    b.wait("the key is accepted", "document.body.dataset.role === 'inspect' && !!document.querySelector('.card.model')")
    check("no training for an inspect key",
          b.js("getComputedStyle(document.querySelector('nav a[data-view=train]')).display") == "none")
    check("no reload for an inspect key",
          b.js("getComputedStyle(document.querySelector('.card.model button.admin')).display") == "none")
    not_blank(b, "models-inspect-key")
    print("ui: all checks passed")
finally:
    b.proc.kill()
