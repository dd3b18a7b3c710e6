"""`audit export`: a third party verifies it with the README's script, which needs only `cryptography`."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner
from conftest import make_record

from pipeline.cli import main
from pipeline.runtime import Pipeline


def export(home: Path, tmp_path: Path) -> Path:
    pipeline = Pipeline.open(create=True)
    pipeline.write_records([make_record(account="acme"), make_record("job", account="globex", job_id="j")])
    pipeline.audit.append_many({"action": "test.entry", "details": {"n": i, "note": "ünïcode"}} for i in range(20))
    out = tmp_path / "export"
    result = CliRunner().invoke(main, ["audit", "export", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def readme_script(folder: Path, tmp_path: Path) -> Path:
    """The verification script exactly as the exported README documents it."""
    blocks = re.findall(r"```python\n(.*?)```", (folder / "README.md").read_text(), flags=re.S)
    assert len(blocks) == 1
    script = tmp_path / "verify_export.py"
    script.write_text(blocks[0])
    return script


def verify(script: Path, folder: Path) -> subprocess.CompletedProcess[str]:
    # -I: isolated mode, neither the working directory nor PYTHON* variables reach the script
    return subprocess.run(
        [sys.executable, "-I", str(script), str(folder)], capture_output=True, text=True, timeout=60, cwd=script.parent
    )


def test_export_verifies_with_a_standalone_script_using_only_cryptography(home: Path, tmp_path: Path) -> None:
    folder = export(home, tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "entries.jsonl", "manifest.json", "public_key.pem"]
    script = readme_script(folder, tmp_path)
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(ast.parse(script.read_text()))
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
    }
    assert imported == {"hashlib", "json", "sys", "pathlib", "cryptography"}

    result = verify(script, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    lines = (folder / "entries.jsonl").read_text().splitlines()
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"intact: {len(lines)} entries, head {manifest['head']}"
    assert manifest["entries"] == len(lines) == Pipeline.open().audit.verify()
    assert "acme" not in (folder / "entries.jsonl").read_text()  # subjects appear only as refs


def test_an_export_into_the_folder_of_another_homes_verifies(home: Path, tmp_path: Path) -> None:
    """A trail with no checkpoint yet left the folder's earlier checkpoint.json, which its own script then
    refused: "checkpoint.json is not signed by public_key.pem"."""
    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "checkpoint.json").write_text('{"seq": 99, "head": "of another home", "signature": "00"}\n')
    assert export(home, tmp_path) == folder and not (folder / "checkpoint.json").exists()
    result = verify(readme_script(folder, tmp_path), folder)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_script_names_the_first_altered_or_missing_entry(home: Path, tmp_path: Path) -> None:
    folder = export(home, tmp_path)
    script = readme_script(folder, tmp_path)
    lines = (folder / "entries.jsonl").read_text().splitlines(keepends=True)

    altered = json.loads(lines[6])
    altered["details"]["n"] = 1000
    (folder / "entries.jsonl").write_text("".join([*lines[:6], json.dumps(altered) + "\n", *lines[7:]]))
    result = verify(script, folder)
    assert (result.returncode, result.stdout.strip()) == (1, "entry 7: content does not match its hash (altered)")

    (folder / "entries.jsonl").write_text("".join(lines[:3] + lines[4:]))
    result = verify(script, folder)
    assert result.returncode == 1
    assert result.stdout.startswith("entry 4: expected seq 4, found 5")

    (folder / "entries.jsonl").write_text("".join(lines[:-3]))  # the tail cut, no checkpoint to tell
    result = verify(script, folder)
    expected = (
        f"entry {len(lines) - 2}: export ends at seq {len(lines) - 3}; manifest.json records {len(lines)} entries"
    )
    assert (result.returncode, result.stdout.strip()) == (1, expected)
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({**manifest, "entries": len(lines) - 3}))
    assert verify(script, folder).stdout.strip() == "manifest.json is not signed by public_key.pem"
    (folder / "manifest.json").unlink()
    assert verify(script, folder).stdout.strip() == "manifest.json is missing"

    (folder / "entries.jsonl").write_text("".join(lines))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert verify(script, folder).returncode == 0
    (folder / "public_key.pem").write_bytes(_other_public_key())
    assert verify(script, folder).stdout.strip() == "manifest.json is not signed by public_key.pem"


def test_the_script_refuses_content_no_signature_covers_and_damaged_files_in_one_line(
    home: Path, tmp_path: Path
) -> None:
    """A second "records" in an entry's details (a reader keeping the first sees 500) and a field beside the
    signed ones passed as intact; a blank line, a manifest without its head or a missing key were tracebacks."""
    folder = export(home, tmp_path)
    script = readme_script(folder, tmp_path)
    entries = (folder / "entries.jsonl").read_text()
    lines = entries.splitlines(keepends=True)

    def fails(expected: str) -> None:
        result = verify(script, folder)
        assert (result.returncode, result.stderr) == (1, ""), result.stderr
        assert result.stdout.count("\n") == 1 and expected in result.stdout, result.stdout
        (folder / "entries.jsonl").write_text(entries)

    (folder / "entries.jsonl").write_text(
        "".join([*lines[:6], lines[6].replace('"n": ', '"n": 500, "n": '), *lines[7:]])
    )
    fails("entry 7: a key twice in one object: 'n'")
    extra = json.dumps({**json.loads(lines[6]), "records_really_erased": 500}) + "\n"
    (folder / "entries.jsonl").write_text("".join([*lines[:6], extra, *lines[7:]]))
    fails("entry 7: fields no signature covers: records_really_erased")
    (folder / "entries.jsonl").write_text(entries + "\n")
    fails(f"entry {len(lines) + 1}: does not read")
    for handover in (
        '{"action": "audit.signing_key_replaced"}',
        '{"action": "audit.signing_key_replaced", "details": "x"}',
    ):
        (folder / "entries.jsonl").write_text(entries + handover + "\n")
        fails(f"entry {len(lines) + 1}: the line lacks 'seq'")
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").write_text(json.dumps({k: v for k, v in manifest.items() if k != "head"}))
    fails("manifest.json lacks 'head'")
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "public_key.pem").unlink()
    fails("public_key.pem")


def _other_public_key() -> bytes:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return Ed25519PrivateKey.generate().public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
