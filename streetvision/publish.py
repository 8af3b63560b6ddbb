"""``streetvision export-hf``: a verified bundle as a folder ready to push to a model hub.

The folder holds a plain timm model (``model.safetensors`` and ``config.json`` written by timm's own
``save_for_hf``), loadable with ``timm.create_model("local-dir:DIR", pretrained=True)`` and, once pushed,
``"hf-hub:<user>/<repo>"``. Its single output is the roadwork logit with the bundle's decision threshold
folded into the bias, so ``sigmoid(output) >= 0.5`` exactly where the bundle's policy says roadwork
(except a score exactly on the threshold, which the subnet's ``np.round`` reads as 0.5, "no roadwork").
Beside it: ``model_card.json`` with the fields the subnet's ``docs/Mining.md`` requires, a ``README.md``
model card with the held-out metrics and lineage, ``SHA256SUMS`` (``sha256sum -c SHA256SUMS``), and, as
every StreetVision output, ``manifest.json`` last. Pushing is the user's ``huggingface-cli upload``.
"""

from __future__ import annotations

import math
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from streetvision.errors import StreetVisionError
from streetvision.io import store
from streetvision.io.manifests import Manifest, input_record
from streetvision.io.outputs import StepOutputs

STEP = "export_hf"
VERSION = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+")
PARITY_TOLERANCE = 1e-4  # max |logit difference| between the exported model and the bundle's network
CARD_FILES = ("model.safetensors", "config.json")


class PublishError(StreetVisionError):
    """The hub folder cannot be made as asked."""


def _timm_model(predictor) -> tuple[Any, float]:
    """(the bundle's network as a timm classifier with one output, its logit shift).

    The policy is folded into the classifier: an scrc policy's temperature T scales it, and the decision
    threshold t shifts it, so the output is logit/T - logit(t), >= 0 exactly where the policy says
    roadwork (an scrc policy's defer is not expressible in one float and is left out)."""
    import timm
    import torch

    b = predictor.bundle
    model = timm.create_model(b["backbone"], pretrained=False, num_classes=1, **b["model"]["architecture"])
    classifier = model.get_classifier()
    prefix = next(name for name, module in model.named_modules() if module is classifier)
    t = min(max(float(b["policy"]["params"]["threshold"]), 1e-12), 1 - 1e-12)
    shift = math.log(t / (1 - t))  # p >= t  <=>  logit / T >= shift
    temperature = float(b["policy"]["params"].get("temperature", 1.0))
    head = predictor.net.head[-1]
    state = dict(predictor.net.backbone.state_dict())
    state[f"{prefix}.weight"] = head.weight.detach().clone() / temperature
    state[f"{prefix}.bias"] = head.bias.detach().clone() / temperature - shift
    model.load_state_dict(state, strict=True)
    model.eval()
    with torch.no_grad():
        x = torch.randn(4, *b["preprocessing"]["input_size"], generator=torch.Generator().manual_seed(0))
        diff = (model(x) - (predictor.net(x) / temperature - shift)).abs().max().item()
    if not diff <= PARITY_TOLERANCE:
        raise PublishError(f"the exported timm model differs from the bundle's network by {diff:.3g}")
    return model, shift


def readme(bundle: dict[str, Any], card: dict[str, Any], manifest_sha: str, shift: float) -> str:
    held = bundle["held_out"]
    rows = [
        f"| {view} | {r['metrics']['images']} | {r['metrics']['n']} | {r['metrics']['mcc']:.4f} | "
        f"{r['metrics']['accuracy']:.4f} | {r['reward']['served']['reward']:.4f} |"
        for view, r in held.items()
    ]
    lineage = bundle["lineage"]
    return "\n".join(
        [
            "---",
            "library_name: timm",
            "pipeline_tag: image-classification",
            "tags: [image-classification, timm, streetvision, roadwork]",
            "---",
            f"# {card['model_name']} {card['version']}",
            "",
            card["description"],
            "",
            f"A `{bundle['backbone']}` (timm) with one output: the roadwork logit, with the decision threshold "
            f"folded in (bias shifted by {-shift:.6f}), so `sigmoid(output) > 0.5` means roadwork.",
            "",
            "```python",
            "import timm, torch",
            'model = timm.create_model("hf-hub:<user>/<repo>", pretrained=True).eval()',
            "transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))",
            "p = torch.sigmoid(model(transform(image.convert('RGB'))[None]))[0, 0].item()",
            "```",
            "",
            "## Held-out evaluation (val_test, never used for fitting)",
            "",
            "| view | images | rows | MCC | accuracy | simulated subnet reward |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "`challenge`: validator-style views (levels 0-3, 224 px, JPEG q75). Reward: "
            "(0.5·max(0, MCC over 100) + 0.5·accuracy over 10)^3, simulated over val_test.",
            "",
            "## Lineage",
            "",
            f"- bundle manifest sha256: `{manifest_sha}`",
            f"- code version: `{bundle['code_version']}`",
            f"- dataset content sha256: `{lineage.get('dataset', {}).get('content_sha256', 'unknown')}`",
            f"- train_baseline manifest sha256: `{(lineage.get('baseline') or lineage['phase1'])['manifest_sha256']}`",
            f"- policy manifest sha256: `{lineage['policy']['manifest_sha256']}`",
            "",
        ]
    )


def export_hf(
    bundle_uri: str,
    out: str,
    *,
    submitted_by: str,
    version: str = "1.0.0",
    model_name: str = "",
    description: str = "",
) -> Manifest:
    from timm.models import save_for_hf

    from streetvision.predict import Predictor
    from streetvision.steps import check_out_path

    if not VERSION.fullmatch(version):
        raise PublishError(f"--version {version!r}: must be X.Y.Z (e.g. 1.0.0)")
    if not submitted_by.strip() or any(c.isspace() for c in submitted_by):
        raise PublishError("--submitted-by: your wallet's hotkey address (one word)")
    if store.is_s3(out):
        raise PublishError(f"--out {out}: export-hf writes a local folder, to push with huggingface-cli")
    check_out_path(STEP, {"bundle": bundle_uri}, out)  # before anything is written: not inside the bundle
    with store.staged_step(bundle_uri, "export_bundle") as root:
        predictor = Predictor(root)  # verifies the bundle
        source = input_record(root, bundle_uri)
    b = predictor.bundle
    model, shift = _timm_model(predictor)
    card = {
        "model_name": model_name or f"streetvision-{b['backbone'].split('.')[0]}",
        "description": description
        or "StreetVision roadwork classifier (1 = roadwork), trained with StreetVision.",
        "version": version,
        "submitted_by": submitted_by,
        "submission_time": int(time.time()),
    }
    prep = b["preprocessing"]
    data_config = {
        k: prep[k] for k in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    }
    with tempfile.TemporaryDirectory(prefix="sv-hf-") as tmp, StepOutputs(Path(out), STEP) as outputs:
        save_for_hf(
            model,
            tmp,
            model_config={"label_names": ["roadwork"]},
            model_args=b["model"]["architecture"],
            safe_serialization=True,
            data_config=data_config,
        )
        for name in CARD_FILES:
            outputs.copy(name, Path(tmp) / name)
        outputs.write_json("model_card.json", card)
        outputs.write_text("README.md", readme(b, card, source["manifest_sha256"], shift))
        sums = "".join(f"{w.sha256}  {n}\n" for n, w in sorted(outputs.files.items()))
        outputs.write_text("SHA256SUMS", sums)
        return outputs.commit(
            config={"version": version, "model_name": card["model_name"]},
            inputs={"bundle": source},
            metrics={"threshold_logit": shift},
        )
