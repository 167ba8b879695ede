"""What users bring (issue "Real clusters and real folders"): images that are not 8-bit single-frame RGB,
folder layouts with hidden and empty folders, split files with paths, unreadable images in every subset,
bad values for every numeric flag. Each kind is decided in one place (the reader, the scanner, the split
code, the samplers' pools, the parser) and each is tested here against an independent reference."""
import argparse
import io
import json
import random
import signal
import struct
import sys
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import baseline
import common
import exemplar
import linear_eval
import moam
import pseudolabel
import rotation
import vat

RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)
G16 = RNG.integers(0, 65536, (12, 20), dtype=np.uint16)


def png16(arr, color_type):
    """A 16-bit PNG written by hand (PIL cannot write 16-bit colour): arr [H, W] or [H, W, C] uint16."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def saved(img, fmt, **kw):
    b = io.BytesIO()
    img.save(b, fmt, **kw)
    return b.getvalue()


def pil_cases():
    """Every (format, mode) PIL writes, with PIL's own conversion to RGB as the reference."""
    cases = {}
    for fmt in ["PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM"]:
        for mode in ["1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"]:
            try:
                data = saved(Image.fromarray(RGB).convert(mode), fmt)
            except (OSError, ValueError, KeyError):
                continue  # PIL cannot write this mode in this format
            ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            cases[f"{fmt}-{mode}"] = (data, ref, 3 if fmt in ("JPEG", "WEBP") else 0)
    return cases


def deep_cases():
    """Deeper than 8 bits, several frames: the reference is computed here from the numbers written."""
    grey16 = np.repeat((G16 >> 8).astype(np.uint8)[..., None], 3, 2)
    rgb16 = RNG.integers(0, 65536, (12, 20, 3), dtype=np.uint16)
    rgba16 = RNG.integers(0, 65536, (12, 20, 4), dtype=np.uint16)
    frames = [Image.fromarray(RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)) for _ in range(3)]
    return {
        "PNG-16-bit-grey": (png16(G16, 0), grey16, 0),
        "PNG-16-bit-RGB": (png16(rgb16, 2), (rgb16 >> 8).astype(np.uint8), 0),
        "PNG-16-bit-RGBA": (png16(rgba16, 6), (rgba16[..., :3] >> 8).astype(np.uint8), 0),
        "PNG-16-bit-grey-alpha": (png16(np.stack([G16, G16], -1), 4), grey16, 0),
        "PNG-I;16-by-PIL": (saved(Image.fromarray(G16), "PNG"), grey16, 0),
        "TIFF-I;16": (saved(Image.fromarray(G16), "TIFF"), grey16, 0),
        "TIFF-I-32-bit": (saved(Image.fromarray(G16.astype(np.int32)), "TIFF"), grey16, 0),
        "TIFF-F-float-0-to-1": (saved(Image.fromarray(G16.astype(np.float32) / 65535), "TIFF"),
                                np.repeat((G16.astype(np.float64) / 65535 * 255).astype(np.uint8)[..., None], 3, 2), 1),
        "GIF-animated": (saved(frames[0].convert("P"), "GIF", save_all=True, append_images=[f.convert("P") for f in frames[1:]]),
                         np.asarray(frames[0].convert("P").convert("RGB")), 0),
        "PNG-animated": (saved(frames[0], "PNG", save_all=True, append_images=frames[1:]), np.asarray(frames[0]), 0),
        "WEBP-animated": (saved(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True),
                          np.asarray(frames[0]), 0),
    }


CASES = {**pil_cases(), **deep_cases()}


@pytest.mark.parametrize("case", CASES)
def test_every_image_is_uint8_rgb(case, tmp_path):
    data, ref, tol = CASES[case]
    path = tmp_path / f"img.{case.split('-')[0].lower()}"
    path.write_bytes(data)
    img = common.read_image(str(path))
    assert img.dtype == torch.uint8 and img.shape == (3, *ref.shape[:2])
    assert np.abs(img.permute(1, 2, 0).numpy().astype(int) - ref.astype(int)).max() <= tol


def test_the_pil_cases_cover_the_usual_modes():
    assert {"PNG-1", "PNG-L", "PNG-LA", "PNG-P", "PNG-RGBA", "JPEG-CMYK", "JPEG-L", "BMP-P", "TIFF-CMYK", "TIFF-LAB",
            "TIFF-YCbCr", "GIF-L", "WEBP-RGBA", "PPM-1"} <= set(CASES)


@pytest.mark.parametrize("content", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 30, saved(Image.fromarray(RGB), "JPEG")[:200]])
def test_an_unreadable_image_is_one_line_naming_the_file(content, tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(content)
    with pytest.raises(common.UserError, match=f"cannot read image {path}"):
        common.read_image(str(path))


def test_mixed_bit_depths_batch_and_stay_in_range(tmp_path):
    """The reported crash: 8- and 16-bit PNGs in one batch; and 16-bit must reach the network in [-1, 1]."""
    (tmp_path / "a.png").write_bytes(saved(Image.fromarray(RGB), "PNG"))
    (tmp_path / "b.png").write_bytes(png16(np.full((12, 20, 3), 65535, np.uint16), 2))
    (tmp_path / "c.gif").write_bytes(CASES["GIF-animated"][0])
    files = [str(tmp_path / n) for n in ("a.png", "b.png", "c.gif")]
    ds = common.Images(files, np.zeros(3, int), lambda img, rng: common.eval_view(img, rng, 16))
    x, hsv, y, idx = next(iter(torch.utils.data.DataLoader(ds, batch_sampler=[[(i, "") for i in range(3)]])))
    x = common.to_input(x, hsv, torch.device("cpu"), SimpleNamespace(channels_last=False))
    assert x.shape == (3, 3, 16, 16) and x.min() >= -1 and x.max() <= 1 and x[1].min() == 1


# ---------------------------------------------------------------- folders ----
def tree(root, spec):
    """spec: {relative path: bytes}; writes the files under root."""
    for rel, data in spec.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


PNG = saved(Image.fromarray(RGB), "PNG")


def test_hidden_files_and_folders_are_not_data(tmp_path):
    root = tree(tmp_path, {"train/a/1.png": PNG, "train/a/.ipynb_checkpoints/1-checkpoint.png": PNG,
                           "train/.ipynb_checkpoints/x.png": PNG, "train/b/2.png": PNG, "train/b/._2.png": b"AppleDouble",
                           "train/b/.DS_Store": b"", "train/b/notes.txt": b"", "val/.ipynb_checkpoints/y.png": PNG,
                           "val/a/3.PNG": PNG, "val/b/4.jpeg": saved(Image.fromarray(RGB), "JPEG")})
    classes, files, labels = common.scan(str(root / "train"), "train/")
    assert classes == ["a", "b"] and [f.split("train/")[1] for f in files] == ["a/1.png", "b/2.png"] and list(labels) == [0, 1]
    assert common.scan(str(root / "val"), "val/")[0] == ["a", "b"]


@pytest.mark.parametrize("where", ["train", "val"])
@pytest.mark.parametrize("labels", [100, 10])
@pytest.mark.parametrize("empty", ["c", "__MACOSX"])
def test_a_class_folder_without_images_is_named(where, labels, empty, tmp_path):
    spec = {f"{s}/{c}/{i}.png": PNG for s in ("train", "val") for c in ("a", "b") for i in range(10)}
    spec[f"{where}/{empty}/._0.png" if empty == "__MACOSX" else f"{where}/{empty}/readme.txt"] = b"x"
    tree(tmp_path, spec)
    args = SimpleNamespace(data=str(tmp_path), out=str(tmp_path / "out"), split_seed=0, val_split="public", val_size=10,
                           val_subsets=[], split_file=None, labels=labels, img_size=16, crop="inception",
                           stem="imagenet", normalize=False, arch="resnet18", width=0.25)
    with pytest.raises(common.UserError, match=f"{tmp_path / where / empty}: a class folder with no images"):
        common.load_data(args, 0, 1)


def synthetic_files(tmp_path):
    root = common.make_synthetic(str(tmp_path / "syn"), 10, 100, 16)
    return root, *common.scan(root + "/train", "train/")


def split_args(path, labels=1, **kw):
    return SimpleNamespace(split_seed=0, val_split="public", val_size=10, val_subsets=[], split_file=str(path),
                           labels=labels, **kw)


@pytest.mark.parametrize("form", ["c{c:03d}/{i:05d}.jpg", "train/c{c:03d}/{i:05d}.jpg", "{root}/train/c{c:03d}/{i:05d}.jpg",
                                  "c{c:03d}\\{i:05d}.jpg", "./c{c:03d}/{i:05d}.jpg"])
def test_split_file_matches_the_class_folder_when_it_gives_one(form, tmp_path):
    """The reported case: every synthetic class has a 00000.jpg; six lines must select those six images."""
    root, classes, files, labels = synthetic_files(tmp_path)
    want = [(0, 0), (1, 0), (2, 0), (3, 5), (7, 0), (9, 99)]
    (tmp_path / "split.txt").write_text("\n".join(form.format(root=root, c=c, i=i) for c, i in want) + "\n")
    L, *_ = common.make_splits(labels, classes, split_args(tmp_path / "split.txt"), files, root + "/train")
    assert [files[i] for i in L] == [f"{root}/train/c{c:03d}/{i:05d}.jpg" for c, i in want]


@pytest.mark.parametrize("content,words", [
    ("00000.jpg\n", "'00000.jpg' names 10 images"),
    ("c000/00000.jpg\nc000/99999.jpg\n", "1 of its 2 entries are not images under"),
    ("c999/00000.jpg\n", "not images under"),
    ("\n\n", "lists no images"),
    ('{"values": ["c000/00000.jpg",}', "not the authors' JSON format"),
    ('{"images": ["c000/00000.jpg"]}', "not the authors' JSON format"),
    ('{"values": "c000/00000.jpg"}', "not the authors' JSON format"),
])
def test_split_file_mistakes_are_one_line(content, words, tmp_path):
    root, classes, files, labels = synthetic_files(tmp_path)
    (tmp_path / "split.txt").write_text(content)
    with pytest.raises(common.UserError, match=words.replace("(", r"\(").replace(")", r"\)")):
        common.make_splits(labels, classes, split_args(tmp_path / "split.txt"), files, root + "/train")


@pytest.mark.parametrize("listed,labels,ok", [(10, 1, True), (10, 10, False), (100, 10, True), (100, 1, False),
                                              (100, 0, False), (60, 10, True)])
def test_a_split_file_must_agree_with_the_recipe_of_labels(listed, labels, ok, tmp_path):
    """--labels picks the recipe (10%: 200 epochs at lr 0.1; 1%: 1000 at 0.01): a 1% file with --labels 10 is refused."""
    root, classes, files, y = synthetic_files(tmp_path)
    (tmp_path / "split.json").write_text(json.dumps({"values": [f.split("/train/")[1] for f in files[:listed]]}))
    call = lambda: common.make_splits(y, classes, split_args(tmp_path / "split.json", labels), files, root + "/train")
    if ok:
        assert len(call()[0]) == listed
    else:
        with pytest.raises(common.UserError, match=f"lists {listed} of the 1000 training images.*--labels is {labels}"):
            call()


# ---------------------------------------------------------------- --skip-bad-images ----
@pytest.mark.parametrize("subset", ["labeled", "unlabeled", "hold-out", "val"])
def test_skip_bad_images_never_returns_an_image_from_outside_the_subset(subset, tmp_path):
    """The reported label leak: an unreadable labeled image was replaced by the next file of the whole list."""
    args = SimpleNamespace(data="synthetic", synthetic=[4, 40, 16], out=str(tmp_path), split_seed=0, seed=0,
                           val_split="custom" if subset == "hold-out" else "public", val_size=20, val_subsets=[],
                           split_file=None, labels=25, batch_size=8, workers=0, img_size=16, crop="inception",
                           skip_bad_images=True, channels_last=False, amp="none", stem="imagenet", normalize=False, arch="resnet18",
                           width=0.25)
    d = common.load_data(args, 0, 1)
    sets = {"labeled": d.labeled, "unlabeled": np.setdiff1d(d.unlabeled, d.labeled), "hold-out": d.val_index,
            "val": d.val_index}
    files = d.val_files if subset == "val" else d.files
    bad = sets[subset][[0, 1, 5]]  # a run of two, then another
    for i in bad:
        open(files[i], "wb").write(b"broken")
    view = lambda img, rng: common.train_view(img, rng, 16)
    if subset in ("labeled", "unlabeled"):
        pool = d.labeled if subset == "labeled" else d.unlabeled
        batches = common.EpochBatches(pool, 8, 0, 0, 1)
        seen = [i for _, _, _, idx in common.loader(d.files, d.labels, view, batches, args, torch.device("cpu")) for i in idx.tolist()]
        assert set(seen) <= set(pool.tolist()) and not set(seen) & set(bad.tolist())
        assert len(seen) == len(pool) // 8 * 8
    else:
        loader = common.eval_loader(files, d.val_labels, d.val_index, args, 0, 1, torch.device("cpu"))
        seen = [i for _, _, _, idx in loader for i in idx.tolist()]
        assert sorted(i for i in seen if i >= 0) == sorted(set(d.val_index.tolist()) - set(bad.tolist()))
        assert seen.count(-1) == 3
        zero = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(4))
        zero(torch.zeros(1, 3, 16, 16)), torch.nn.init.zeros_(zero[1].weight), torch.nn.init.eye_(zero[1].bias[None])
        acc = common.evaluate(zero, loader, d, args, torch.device("cpu"), 1)
        truth = d.val_labels[np.setdiff1d(d.val_index, bad)]
        assert acc["top1"] == pytest.approx(100 * (truth == 0).mean())  # the logits put class 0 first
    listed = [line.split("\t") for line in open(tmp_path / "skipped.txt").read().splitlines()]
    assert {path for path, _ in listed} == {files[i] for i in bad} and all("cannot read" in why for _, why in listed)


# ---------------------------------------------------------------- every bad value is one line ----
SCRIPTS = {"baseline": (baseline, []), "rotation": (rotation, []), "vat": (vat, []), "exemplar": (exemplar, []),
           "pseudolabel": (pseudolabel, ["--teacher", "/nonexistent/final.pt"]),
           "linear_eval": (linear_eval, ["--ckpt", "/nonexistent/final.pt"]), "moam": (moam, ["--step", "1"])}


@pytest.fixture
def in_process(monkeypatch, capsys):
    """Run a script's main() here as a user runs it; returns its exit code (an `error: ...` string, or a number)."""
    saved_handlers = {s: signal.getsignal(s) for s in common.STOP_SIGNALS}

    def call(script, *argv):
        monkeypatch.setattr(sys, "argv", [f"{script.__name__}.py", *map(str, argv)])
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            common.main_guard(script.main)
        printed = capsys.readouterr().err.strip().splitlines()
        return printed[-1] if e.value.code == 1 and printed else e.value.code
    yield call
    for s, h in saved_handlers.items():
        signal.signal(s, h)
    common._state.signal, common._state.deferred, common._state.bar = None, False, None


def numeric_flags(module):
    """The flags of a script's parser that take numbers, found by parsing: every such flag is tested."""
    class Parsed(Exception):
        pass
    found = {}

    def grab(self, *a, **k):
        found.update({a.option_strings[0]: a for a in self._actions if a.option_strings and a.help != "==SUPPRESS=="})
        raise Parsed
    with pytest.MonkeyPatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", grab)
        m.setattr(sys, "argv", [f"{module.__name__}.py"])
        with pytest.raises(Parsed):
            module.main()
    numeric = []
    for flag, action in found.items():
        v = None
        for probe in ("1", "1,1,1"):
            try:
                v = action.type(probe) if action.type else None
                break
            except Exception:
                pass
        if isinstance(v, (int, float)) or (isinstance(v, list) and v and isinstance(v[0], (int, float))):
            numeric.append(flag)
    return numeric


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_numeric_flag_rejects_garbage_in_one_line(name, in_process):
    module, required = SCRIPTS[name]
    flags = numeric_flags(module)
    assert {"--labels", "--batch-size", "--epochs", "--lr", "--workers", "--log-every", "--synthetic"} <= set(flags)
    for flag in flags:
        for value in ["0", "-1", "abc", "nan", "1e999"]:
            code = in_process(module, "--data", "/nonexistent", *required, flag, value)
            assert isinstance(code, str) and code.startswith("error: ") and "\n" not in code, (flag, value, code)
            accepted = "/nonexistent" in code
            assert accepted or flag in code, (flag, value, code)
            assert not accepted or value == "0", (flag, value, code)  # -1, words, nan and inf are never numbers here


def test_the_reported_bad_values_are_one_line(in_process, tmp_path):
    for argv, words in [(["--synthetic", "10,100"], "--synthetic"), (["--batch-size", "0"], "--batch-size"),
                        (["--log-every", "0"], "--log-every"), (["--workers", "-1"], "--workers")]:
        code = in_process(baseline, "--data", "synthetic", "--out", tmp_path, *argv)
        assert code.startswith("error: ") and words in code, code
