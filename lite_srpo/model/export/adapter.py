"""Adapter export: the checkpoint's peft adapter and the base's processor, reloaded onto a fresh base to verify."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .monitor import release_later
from .plan import ExportPlan
from .source import ADAPTER_FILES
from .verify import probe_inputs, probe_logits


def write_adapter(plan: ExportPlan, tmp: Path) -> None:
    from ..processors import load_processor

    for name in ADAPTER_FILES:
        shutil.copy2(plan.source.adapter_dir / name, tmp / name)
    config_file = tmp / ADAPTER_FILES[0]
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = plan.base
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    load_processor(plan.base, trust_remote_code=plan.source.cfg.model.trust_remote_code).save_pretrained(tmp)


def adapter_logits(plan: ExportPlan, tmp: Path) -> torch.Tensor:
    """Reload the exported adapter (and the exported processor) onto a fresh base, as a user would."""
    from ..policy import load_policy
    from ..processors import model_family, processor_class

    policy = load_policy(plan.model_cfg, plan.source.cfg.lora, adapter_path=str(tmp), trainable=False,
                         device=plan.device)
    policy.model.eval()
    processor = processor_class(model_family(policy.config)).from_pretrained(str(tmp))
    logits = probe_logits(policy.model, probe_inputs(processor, plan.fmt))
    release = release_later(policy.model)
    del policy
    release()
    return logits
