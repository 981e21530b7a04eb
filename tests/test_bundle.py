"""A bundle is served only when every file matches its manifest."""

from __future__ import annotations

import json

import pytest

from service.bundle import BundleError, load_bundle
from tests.conftest import run_cli


def test_serve_refuses_a_file_that_does_not_match_its_sha256(bundle_copy):
    block = sorted((bundle_copy / "blocks").iterdir())[0]
    block.write_bytes(block.read_bytes() + b"\0")
    done = run_cli("instanas-serve", "--model", str(bundle_copy), "--port", "0", timeout=60)
    assert done.returncode == 2
    assert f"blocks/{block.name} has sha256" in done.stderr and "the manifest says" in done.stderr


@pytest.mark.parametrize("damage, message", [
    ("delete_file", "is listed in the manifest but missing"),
    ("bad_json", "not valid JSON"),
    ("bad_schema", "does not match the manifest schema"),
    ("escape", "outside the bundle"),
    ("no_manifest", "no manifest.json"),
])
def test_broken_bundles_fail_with_a_clear_message(bundle_copy, damage, message):
    manifest = bundle_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    if damage == "delete_file":
        (bundle_copy / "head.onnx").unlink()
    elif damage == "bad_json":
        manifest.write_text("{")
    elif damage == "bad_schema":
        data["classes"] = data["classes"][:1]
        manifest.write_text(json.dumps(data))
    elif damage == "escape":
        data["head"]["file"] = "../../etc/passwd"
        manifest.write_text(json.dumps(data))
    elif damage == "no_manifest":
        manifest.unlink()
    with pytest.raises(BundleError, match=message):
        load_bundle(bundle_copy)


def test_onnxruntime_threads_never_spin_against_the_server():
    """With more than one thread a graph, idle pool threads must sleep, not spin: spinning took
    throughput from 665 to 25 requests/s on 2 cores (docs/RESULTS.md, process and thread model)."""
    from service.bundle import session_options

    assert session_options(2).get_session_config_entry("session.intra_op.allow_spinning") == "0"
    one = session_options(1)
    assert one.intra_op_num_threads == 1 and one.inter_op_num_threads == 1
