"""`amxtune-train lora`: LoRA adapters on the UNet's attention projections (and optionally the
text encoder's), DreamBooth style, on one rank or many.

Adapters are peft's, as in diffusers' train_dreambooth_lora.py (gaussian init, alpha = rank by
default); they are kept in fp32 while the frozen networks run in the precision the CPU supports.
Only the adapters' gradients cross between ranks. Prompts are the instance prompt ("a photo of
sks toy") or each image's caption.
"""

from __future__ import annotations

import argparse
import contextlib
import random
from pathlib import Path

from amxtune_trainer import options
from amxtune_trainer.engine import Trainer
from amxtune_trainer.errors import UserError
from amxtune_trainer.runtime import run_recipe

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    options.configure_parser(parser, Lora.METHOD)


def run(args: argparse.Namespace) -> int:
    return run_recipe(args, Lora)


def _targeted_linears(model, suffixes: list[str]) -> list[tuple[str, object]]:
    import torch

    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)
            and any(name == s or name.endswith("." + s) for s in suffixes)]


def _expected_shapes(model, suffixes: list[str], rank: int) -> dict[str, tuple[int, int]]:
    """peft's key -> shape of the adapter matrices for every targeted layer."""
    shapes = {}
    for name, module in _targeted_linears(model, suffixes):
        shapes[f"{name}.lora_A.weight"] = (rank, module.in_features)
        shapes[f"{name}.lora_B.weight"] = (module.out_features, rank)
    return shapes


def read_initial_weights(path_text: str, expected: dict[str, dict]) -> dict[str, dict]:
    """The adapters of a diffusers-format LoRA file, per network in peft's naming, checked
    against the layers and rank these options would create (UserError otherwise)."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    from amxtune_trainer.export_sources import resolve_lora

    try:
        path = resolve_lora(path_text)  # the file or its folder, readable, with LoRA keys
    except UserError as error:
        raise UserError(f"lora.initial_weights: {error}") from None
    tensors = load_file(str(path))
    found = {}
    for network, convert in (("unet", convert_unet_state_dict_to_peft),
                             ("text_encoder", convert_state_dict_to_peft)):
        part = {k[len(network) + 1:]: v for k, v in tensors.items()
                if k.startswith(network + ".")}
        if part:
            found[network] = convert(part)
    for network in set(found) | set(expected):
        have = {k: tuple(v.shape) for k, v in found.get(network, {}).items()}
        want = expected.get(network, {})
        if have != want:
            odd = sorted(set(have) ^ set(want)) or sorted(k for k in have if have[k] != want[k])
            raise UserError(
                f"lora.initial_weights: {path} does not match these LoRA options on this "
                f"model ({network}: {len(have)} tensors, expected {len(want)}; first "
                f"difference {odd[0]}: {have.get(odd[0])} vs {want.get(odd[0])})"
            )
    return found


def _check_rank(model, suffixes: list[str], rank: int, where: str) -> None:
    found = _targeted_linears(model, suffixes)
    if not found:
        raise UserError(f"lora.target_modules: none of {', '.join(suffixes)} is a linear layer "
                        f"of this model's {where}")
    name, smallest = min(found, key=lambda item: min(item[1].in_features,
                                                     item[1].out_features))
    limit = min(smallest.in_features, smallest.out_features)
    if rank > limit:
        raise UserError(f"lora.rank: {rank} is larger than the smallest targeted layer of the "
                        f"{where} ({name}: {smallest.in_features}x{smallest.out_features}); "
                        f"use at most {limit}")


class Lora(Trainer):
    METHOD = "lora"

    def __init__(self, config, info, cpus: list | None = None):
        super().__init__(config, info, cpus)
        self.lora = config.lora
        self.targets = [str(t) for t in self.lora.target_modules]

    def check_concept(self, concept) -> None:
        if self.lora.instance_prompt is None:
            missing = [f.name for f, c in zip(concept.files, concept.captions, strict=True)
                       if not (c or "").strip()]
            if missing:
                raise UserError(
                    "lora.instance_prompt: give an instance prompt (e.g. 'a photo of sks toy'), "
                    f"or a caption file for every image with use_captions ({len(missing)} "
                    f"without: {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"
                )

    def check_model(self, components):
        if self.rt.accelerator == "ipex":
            raise UserError("accelerator 'ipex' does not take LoRA adapters (its prepacked "
                            "layers replace the ones peft wraps); use accelerator 'none'")
        _check_rank(components.unet, self.targets, self.lora.rank, "UNet")
        expected = {"unet": _expected_shapes(components.unet, self.targets, self.lora.rank)}
        if self.lora.train_text_encoder:
            _check_rank(components.text_encoder, TEXT_ENCODER_TARGETS, self.lora.rank,
                        "text encoder")
            expected["text_encoder"] = _expected_shapes(components.text_encoder,
                                                        TEXT_ENCODER_TARGETS, self.lora.rank)
        if self.lora.initial_weights:
            return read_initial_weights(self.lora.initial_weights, expected)
        return None

    def _settings(self) -> dict:
        return {"rank": self.lora.rank, "alpha": self.lora.scale_alpha,
                "target_modules": self.targets,
                "train_text_encoder": self.lora.train_text_encoder}

    def check_resume(self, state: dict, resume: Path | None) -> None:
        saved = state.get("lora_settings")
        if state.get("method") != self.METHOD or saved != self._settings():
            raise UserError(
                f"checkpoint {resume or 'on rank 0'} was made for "
                f"{saved or state.get('method') or 'textual-inversion'}, not for LoRA with "
                f"{self._settings()}; use another output folder or matching options"
            )

    def _config(self, targets: list[str]):
        from peft import LoraConfig

        return LoraConfig(r=self.lora.rank, lora_alpha=self.lora.scale_alpha,
                          lora_dropout=self.lora.dropout, init_lora_weights="gaussian",
                          target_modules=targets)

    def attach(self, checked, state: dict | None) -> list:
        self.unet.add_adapter(self._config(self.targets))
        self.networks = {"unet": self.unet}
        if self.lora.train_text_encoder:
            self.text_encoder.add_adapter(self._config(TEXT_ENCODER_TARGETS))
            self.networks["text_encoder"] = self.text_encoder
        self.named = {f"{key}.{name}": parameter for key, network in self.networks.items()
                      for name, parameter in network.named_parameters()
                      if parameter.requires_grad}
        for parameter in self.named.values():
            parameter.data = parameter.data.float()  # adapters train in fp32
        # peft adds its dropout modules in training mode into networks that are in eval mode
        self.dropouts = [module for network in self.networks.values()
                         for name, module in network.named_modules()
                         if ".lora_dropout." in f".{name}."]
        self.set_training(False)
        if state is not None:
            for name, value in state["lora"].items():
                self.named[name].data.copy_(value)
        elif checked:  # lora.initial_weights, checked to fit
            from peft import set_peft_model_state_dict

            for key, layers in checked.items():
                set_peft_model_state_dict(self.networks[key], layers)
        return list(self.named.values())

    def _prompt(self, caption: str | None) -> str:
        """The caption is the whole prompt (as kohya's and diffusers' captioned LoRA training
        use it); '{}' in it stands for the instance prompt, which also stands in for a missing
        or empty caption."""
        instance = self.lora.instance_prompt or ""
        caption = " ".join((caption or "").split())
        if not caption:
            return instance
        return caption.replace("{}", instance) if "{}" in caption else caption

    def train_prompts(self, indices: list[int], rng: random.Random) -> list[str]:
        return [self._prompt(self.latents.captions[i]) for i in indices]

    def eval_prompts(self, indices: list[int]) -> list[str]:
        return [self._prompt(self.latents.captions[i]) for i in indices]

    def method_state(self) -> dict:
        return {"lora": {name: p.detach().clone() for name, p in self.named.items()},
                "lora_settings": self._settings()}

    def set_training(self, on: bool) -> None:
        for module in self.dropouts:
            module.train(on)

    def _peft_layers(self) -> dict:
        from peft.utils import get_peft_model_state_dict

        return {key: get_peft_model_state_dict(network) for key, network in self.networks.items()}

    def _layers(self) -> dict:
        """Each network's adapter weights in diffusers' naming, as its own script saves them."""
        from diffusers.utils import convert_state_dict_to_diffusers

        return {key: convert_state_dict_to_diffusers(layers)
                for key, layers in self._peft_layers().items()}

    def write_weights(self, folder: Path) -> None:
        from amxtune_trainer import outputs

        outputs.write_lora(folder / outputs.LORA_FILE, self._layers(), self._metadata())

    def _metadata(self) -> dict:
        return {key: network.peft_config["default"].to_dict()
                for key, network in self.networks.items()}

    def periodic_outputs(self, step: int) -> None:
        from amxtune_trainer import outputs

        outputs.write_lora(self.output_dir / f"pytorch_lora_weights-steps-{step}.safetensors",
                           self._layers(), self._metadata())

    def final_outputs(self) -> dict:
        from amxtune_trainer import outputs

        out = self.output_dir
        weights = outputs.write_lora(out / outputs.LORA_FILE, self._layers(), self._metadata())
        kohya = outputs.write_lora_kohya(out / outputs.LORA_KOHYA_FILE, self._peft_layers(),
                                         self.lora.scale_alpha)
        if self.opt.save_as_full_pipeline:
            outputs.save_full_pipeline(self.model_path, out / outputs.PIPELINE_DIR,
                                       lambda pipeline: outputs.fuse_lora(pipeline, weights))
        return {"lora_weights": str(weights.resolve()), "lora_weights_kohya": str(kohya.resolve())}

    @contextlib.contextmanager
    def _adapters_off(self):
        for network in self.networks.values():
            network.disable_adapters()
        try:
            yield
        finally:
            for network in self.networks.values():
                network.enable_adapters()

    def concept_rows(self) -> dict:
        prompt = self._prompt(self.concept.captions[0] if self.concept.captions else None)
        return {"learned": (prompt, contextlib.nullcontext()),
                "before": (prompt, self._adapters_off())}

    def method_metrics(self) -> dict:
        return {"lora": {**self._settings(), "dropout": self.lora.dropout,
                         "instance_prompt": self.lora.instance_prompt}}
