"""draw_decision.py's command line: an existing PNG is refused before the log is read, and the
one-line error names the flag that replaces it (--overwrite)."""
import argparse
import json

import pytest

import draw_decision


def test_existing_png_is_refused_naming_overwrite(tmp_path):
    log = tmp_path / "metrics.jsonl"
    log.write_text(json.dumps({"step": 10, "kept_indices": [0, 3], "confidences": [0.6, 0.9],
                               "groups": [[1, 2], [1, 2]]}) + "\n")
    out = tmp_path / "decision.png"
    out.write_bytes(b"an earlier plot")
    args = argparse.Namespace(log=str(tmp_path), out=None, title=None, overwrite=False)
    with pytest.raises(SystemExit) as refused:
        draw_decision.main(args)
    message = str(refused.value)
    assert message.startswith("error:") and "\n" not in message and "--overwrite" in message and str(out) in message
    assert out.read_bytes() == b"an earlier plot"
    draw_decision.main(argparse.Namespace(log=str(log), out=None, title=None, overwrite=True))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
