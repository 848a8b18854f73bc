"""`harken model export`: a source's model with its normal reference overlay folded in, as a
new artifact (the original is not touched). k-NN banks hold the judged windows; Gaussian
scorers carry them as `exemplars` (monitor/overlay.py). The calibration and threshold are
the original model's."""

from __future__ import annotations

from pathlib import Path

from monitor.artifact import load_artifact, save_artifact
from monitor.errors import UsageError


def export_with_reference(model_dir: str | Path, overlay, out_dir: str | Path, *,
                          source: str) -> Path:
    from monitor.detector import Detector
    from monitor.overlay import with_reference

    if overlay.windows == 0:
        raise UsageError(f"the normal reference of {source} is empty: nothing to export "
                         "(the model itself is the artifact)")
    if Path(out_dir).absolute().resolve() == Path(model_dir).absolute().resolve():
        raise UsageError("--out must not be the source's own model: the artifact is never modified")
    art = load_artifact(model_dir)
    det = with_reference(Detector.from_artifact(art, "cpu"), overlay.embeddings, overlay.machine_ids)
    tensors = {k: v for k, v in art.tensors.items() if not k.startswith("scorer.")}
    for name, scorer in det.scorers.items():
        tensors.update({f"scorer.{name}.{k}": v for k, v in scorer.state_tensors().items()})
    # save_artifact stamps the format, versions, time and tensor hash afresh
    manifest = art.manifest.with_updates(
        scorers=[{**old, **det.scorers[old["name"]].config()} for old in art.manifest.scorers],
        reference_overlay={"source": source, "version": overlay.version,
                           "windows": overlay.windows, "from_model": str(model_dir),
                           "verdicts": [e.to_json() for e in overlay.entries]})
    return save_artifact(out_dir, manifest, tensors,
                         verify=lambda staged: Detector.load(staged, device="cpu"))
