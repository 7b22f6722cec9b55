import json

from lobass.artifacts import ensure_artifact, fingerprint, is_complete


def test_fingerprint_is_canonical():
    assert fingerprint({"a": 1, "b": [1, 2]}) == fingerprint({"b": [1, 2], "a": 1})
    assert fingerprint({"a": 1}) != fingerprint({"a": 2})


def test_artifact_is_built_once_and_rebuilt_when_corrupted(tmp_path):
    calls = []

    def build(work):
        calls.append(work)
        (work / "data.json").write_text(json.dumps({"x": len(calls)}))
        return {"n": len(calls)}

    target = tmp_path / "stage" / "key"
    path, reused = ensure_artifact(target, build)
    assert (path, reused, len(calls)) == (target, False, 1) and is_complete(target)
    assert not (tmp_path / "stage" / "key.partial").exists()
    assert ensure_artifact(target, build) == (target, True) and len(calls) == 1
    (target / "data.json").write_text('{"x": 99}')  # edited in place: same size, other bytes
    assert not is_complete(target)
    assert ensure_artifact(target, build) == (target, False) and len(calls) == 2
    assert json.loads((target / "data.json").read_text()) == {"x": 2}
