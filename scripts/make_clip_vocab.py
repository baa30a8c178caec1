#!/usr/bin/env python
"""Regenerate the CLIP tokenizer data shipped in sd/data/ from its public source, verifying every step.

Source: ``open_clip/bpe_simple_vocab_16e6.txt.gz`` in the open-clip-torch 3.3.0 wheel (the BPE file of
OpenAI CLIP). The wheel is fetched with ``pip download --no-deps`` into a temporary directory (or given with
``--wheel``); open-clip-torch is never imported or installed.

Steps, each checked against the sha256s recorded in shared/reference/clip-bpe-source.json (also pinned
below, so the script works without the reference directory):
  1. the .gz from the wheel, and its decompressed text;
  2. merges.txt = '#version: 0.2' + lines[1:48895] of that text (line 0 is a header), '\\n'-terminated:
     must hash like the reference clip-merges.txt;
  3. sd/data/clip_merges.txt.gz = that merges.txt, gzipped deterministically (mtime 0);
  4. the vocabulary sd.tokenizer rebuilds from the written file, serialised as json.dumps(vocab,
     ensure_ascii=False) with ids ascending, must hash like the reference clip-vocab.json;
  5. sanity: "a photo of a cat" -> [49406, 320, 1125, 539, 320, 2368, 49407].
It also writes sd/data/LICENSE-clip-bpe.txt (OpenAI CLIP's and open_clip's MIT notices).

Usage: python scripts/make_clip_vocab.py [--wheel PATH] [--check]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # use this checkout's sd.tokenizer, installed or not

from sd import tokenizer as sdtok  # noqa: E402 - needs the sys.path entry above

PACKAGE = "open-clip-torch"
VERSION = "3.3.0"
PATH_IN_WHEEL = "open_clip/bpe_simple_vocab_16e6.txt.gz"
LICENSE_IN_WHEEL = "open_clip_torch-3.3.0.dist-info/licenses/LICENSE"
GZ_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
GZ_SIZE = 1356917
TXT_SHA256 = "67603cfda2e032ad77b5f8808af37789d590db664b26df8705d2bf8b3c553fc8"
TXT_SIZE = 3194984
TXT_LINES = 262146  # split on '\n'
TXT_HEADER = '"bpe_simple_vocab_16e6.txt#version: 0.2'
MERGE_SLICE = slice(1, 48895)  # 48894 merges = 49408 - 2*256 - 2
MERGES_HEADER = "#version: 0.2"
MERGES_SHA256 = "9fd691f7c8039210e0fced15865466c65820d09b63988b0174bfe25de299051a"
VOCAB_SHA256 = "3f0c4f7d2086b61b38487075278ea9ed04edb53a03cbb045b86c27190fa8fb69"
SANITY = ("a photo of a cat", [49406, 320, 1125, 539, 320, 2368, 49407])

OUT_DIR = REPO / "sd" / "data"
MERGES_OUT = OUT_DIR / sdtok.DEFAULT_MERGES_FILE
LICENSE_OUT = OUT_DIR / "LICENSE-clip-bpe.txt"
OPENAI_CLIP_NOTICE = "Copyright (c) 2021 OpenAI"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check(what: str, got: object, want: object) -> None:
    if got != want:
        sys.exit(f"FAIL {what}: got {got!r}, expected {want!r}")
    print(f"ok   {what}")


def reference_dir() -> Path:
    return Path(os.environ.get("SD_REFERENCE_DIR", REPO.parent / "shared" / "reference"))


def cross_check_reference() -> None:
    """If the reference JSON is around, make sure the constants above still say what it says."""
    path = reference_dir() / "clip-bpe-source.json"
    if not path.exists():
        print(f"note {path} not found: using the pinned checksums only")
        return
    ref = json.loads(path.read_text(encoding="utf-8"))
    src = ref["bpe_simple_vocab_16e6"]
    check("reference: package", (src["package"], src["package_version"]), (PACKAGE, VERSION))
    check("reference: path in wheel", src["path_within_package"], PATH_IN_WHEEL)
    check("reference: gz sha256/size", (src["sha256"], src["size_bytes"]), (GZ_SHA256, GZ_SIZE))
    check(
        "reference: txt sha256/size/lines",
        (
            src["decompressed_sha256"],
            src["decompressed_size_bytes"],
            src["decompressed_line_count_split_on_newline"],
        ),
        (TXT_SHA256, TXT_SIZE, TXT_LINES),
    )
    check("reference: merges used", src["merges_used"], MERGE_SLICE.stop - MERGE_SLICE.start)
    check("reference: merges sha256", ref["clip-merges.txt"]["sha256"], MERGES_SHA256)
    check("reference: vocab sha256", ref["clip-vocab.json"]["sha256"], VOCAB_SHA256)
    check("reference: sanity", ref["sanity"][SANITY[0]], SANITY[1])


def fetch_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", f"{PACKAGE}=={VERSION}", "-d", str(dest)]
    print("run ", " ".join(cmd))
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("open_clip_torch-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"FAIL expected one open_clip_torch wheel in {dest}, found {wheels}")
    return wheels[0]


def vocab_bytes(vocab: dict[str, int]) -> bytes:
    """The serialisation the reference clip-vocab.json checksum is of."""
    ordered = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    return json.dumps(ordered, ensure_ascii=False).encode("utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--wheel", type=Path, help="use this open_clip_torch wheel instead of pip download")
    parser.add_argument("--check", action="store_true", help="verify the files in sd/data, write nothing")
    args = parser.parse_args()

    cross_check_reference()
    with tempfile.TemporaryDirectory() as tmp:
        wheel = args.wheel or fetch_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            gz = zf.read(PATH_IN_WHEEL)
            upstream_license = zf.read(LICENSE_IN_WHEEL).decode("utf-8")

    check("bpe gz size", len(gz), GZ_SIZE)
    check("bpe gz sha256", sha256(gz), GZ_SHA256)
    txt = gzip.decompress(gz)
    check("bpe txt size", len(txt), TXT_SIZE)
    check("bpe txt sha256", sha256(txt), TXT_SHA256)
    lines = txt.decode("utf-8").split("\n")
    check("bpe txt lines", len(lines), TXT_LINES)
    check("bpe txt header", lines[0], TXT_HEADER)

    merges_txt = "\n".join([MERGES_HEADER, *lines[MERGE_SLICE]]) + "\n"
    merges_bytes = merges_txt.encode("utf-8")
    check("merges.txt sha256", sha256(merges_bytes), MERGES_SHA256)
    packed = gzip.compress(merges_bytes, compresslevel=9, mtime=0)
    license_text = (
        f"sd/data/{sdtok.DEFAULT_MERGES_FILE} holds the first {MERGE_SLICE.stop - 1} merges of\n"
        f"{PATH_IN_WHEEL} from the {PACKAGE} {VERSION} wheel, the BPE vocabulary of\n"
        "OpenAI CLIP (https://github.com/openai/CLIP, MIT License, Copyright (c) 2021 OpenAI),\n"
        "as redistributed by OpenCLIP (https://github.com/mlfoundations/open_clip) under the\n"
        "licence below. Regenerate with scripts/make_clip_vocab.py.\n\n"
        f"--- {LICENSE_IN_WHEEL} ---\n{upstream_license.rstrip()}\n"
    )

    if args.check:
        shipped = MERGES_OUT.read_bytes()
        # Compare content, not gzip bytes: another zlib build may compress the same text differently.
        check(f"{MERGES_OUT.name} content", sha256(gzip.decompress(shipped)), MERGES_SHA256)
        check(f"{LICENSE_OUT.name} content", LICENSE_OUT.read_text(encoding="utf-8"), license_text)
    else:
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        MERGES_OUT.write_bytes(packed)
        LICENSE_OUT.write_text(license_text, encoding="utf-8")
        print(f"wrote {MERGES_OUT.relative_to(REPO)} ({len(packed)} bytes)")
        print(f"wrote {LICENSE_OUT.relative_to(REPO)} ({LICENSE_OUT.stat().st_size} bytes)")

    # Verify through the runtime code path: what sd.tokenizer rebuilds from the written file.
    merges = sdtok.read_merges(MERGES_OUT)
    check("merges read back", merges, [tuple(line.split(" ")) for line in lines[MERGE_SLICE]])
    check("vocab sha256", sha256(vocab_bytes(sdtok.build_vocab(merges))), VOCAB_SHA256)
    tok = sdtok.CLIPTokenizer(merges_file=MERGES_OUT)
    check("vocab size", tok.vocab_size, sdtok.VOCAB_SIZE)
    check("sanity ids", tok.encode(SANITY[0]), SANITY[1])
    print("all checks passed")


if __name__ == "__main__":
    main()
