"""`amxtune-train export-openvino`: a Stable Diffusion pipeline -> a static OpenVINO pipeline.

Source: a full pipeline folder saved by the trainer (OUTPUT/pipeline), or a base model plus a
learned_embeds.safetensors, whose token(s) are added to the tokenizer and the text encoder
*before* conversion so that the exported pipeline understands the placeholder token, or a base
model with LoRA adapters fused into its weights (export_sources.py prepares both).

The conversion is optimum-intel's (`OVStableDiffusionPipeline.from_pretrained(export=True)`);
then the pipeline is reshaped to a static batch size, height, width and images per prompt,
optionally has its weights compressed (fp16, or int8 with NNCF; int8-full also quantizes the
UNet's activations, calibrated on renders at the export's shape), and is saved as OpenVINO IR.

What optimum-intel saves, and what that means for loading:
- `save_pretrained` writes each model's IR with its *current* shapes, so the saved .xml files
  are static. But `OVStableDiffusionPipeline.from_pretrained(folder)` defaults to
  `dynamic_shapes=True`, which reshapes everything back to dynamic on load. Load with
  `dynamic_shapes=False` (`load_openvino_pipeline` below does) to keep the static shapes.
- `reshape()` gives the VAE decoder a batch of `num_images_per_prompt` only, while the pipeline
  decodes `batch_size * num_images_per_prompt` latents at once; with batch_size > 1 the decode
  fails. We reshape the decoder to the full batch ourselves.
- Without a quantization config, optimum-intel's export compresses models above 1e9 parameters
  to int8 on its own; we pass `load_in_8bit=False` so that fp32 means fp32.
- Hub ids are tried before local folders for relative paths: we pass absolute paths. And
  `local_files_only=True` makes it look a local folder up in the hub cache (and log an error
  line), so it is not passed for local folders.

The export is atomic: everything is written into a temporary folder beside the target and
renamed into place at the end; on failure the temporary folder is removed.
amxtune_export.json in the folder records the options, the source and the tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from amxtune_api.export import OpenVINOExportOptions, WeightFormat
from amxtune_api.training import EMBEDDINGS_FILE, LORA_FILE
from amxtune_trainer.errors import UserError
from amxtune_trainer.export_sources import (
    check_embeddings,
    pipeline_with_embeddings,
    pipeline_with_lora,
    resolve_embeddings,
    resolve_lora,
    resolve_model,
    write_slow_tokenizer_files,
)
from amxtune_trainer.model_flags import add_model_flags, model_from_args

EXPORT_METADATA = "amxtune_export.json"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        "--pipeline",
        "--pretrained-model-name-or-path",
        "--pretrained_model_name_or_path",
        dest="model",
        required=True,
        help="Pipeline to export: the trainer's full pipeline folder (OUTPUT/pipeline), or the "
        "base model (a diffusers folder, a hub id, or a built-in model: 'tiny', 'sd15-arch', "
        "'toyworld') "
        "when --learned-embeds is given.",
    )
    parser.add_argument(
        "--learned-embeds",
        "--learned_embeds",
        dest="learned_embeds",
        help=f"{EMBEDDINGS_FILE} (or the trainer's output folder holding it) whose token(s) are "
        "added to --model before export.",
    )
    parser.add_argument(
        "--token",
        help="Load the embedding under this token instead of the one stored in the file.",
    )
    parser.add_argument(
        "--lora-weights",
        "--lora_weights",
        dest="lora_weights",
        help=f"{LORA_FILE} (or the trainer's output folder holding it): LoRA adapters fused "
        "into --model before export.",
    )
    parser.add_argument("--revision", help="Hub revision of --model.")
    parser.add_argument(
        "--cache",
        help="Folder of base-model exports: --model (a base model, with --learned-embeds or "
        "alone) is exported once per content, options and library versions, and reused after "
        "(the learned token spliced into the cached text encoder). Not used with "
        "--lora-weights.",
    )
    parser.add_argument(
        "--output", "-o", required=True, help="Folder to create with the OpenVINO pipeline."
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace --output if it exists (the old folder is kept until the new one is ready).",
    )
    group = parser.add_argument_group("static shape and weights")
    add_model_flags(group, OpenVINOExportOptions)


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    options = model_from_args(OpenVINOExportOptions, args)
    output = Path(args.output).expanduser().absolute()
    if output.exists() and not args.overwrite:
        raise UserError(f"--output {output} already exists; pass --overwrite to replace it")
    source = resolve_model(args.model, args.revision)
    embeds = resolve_embeddings(args.learned_embeds) if args.learned_embeds else None
    if args.token and not embeds:
        raise UserError("--token needs --learned-embeds")
    lora = resolve_lora(args.lora_weights) if args.lora_weights else None
    if lora and embeds:
        raise UserError("give --learned-embeds or --lora-weights, not both")
    started = time.perf_counter()
    metadata = export_openvino(
        source,
        output,
        options,
        learned_embeds=embeds,
        token=args.token,
        lora_weights=lora,
        revision=args.revision,
        overwrite=args.overwrite,
        cache=Path(args.cache).expanduser() if args.cache else None,
    )
    cache = metadata["cache"]
    if cache:
        print(f"base export {'reused from' if cache['hit'] else 'stored in'} {cache['entry']}",
              flush=True)
    sizes = ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in metadata["weight_bytes"].items())
    print(
        f"exported {args.model} to {output} in {time.perf_counter() - started:.1f} s: "
        f"{options.batch_size}x{options.num_images_per_prompt} images of "
        f"{options.width}x{options.height}, {options.weight_format} weights ({sizes})",
        flush=True,
    )
    return 0


def quiet_libraries() -> None:
    """No progress bars or chatter from diffusers/transformers/optimum in a pod's log."""
    import logging

    os.environ.setdefault("TQDM_DISABLE", "1")
    # Read when the libraries are first imported (import-time messages included).
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("diffusers", "transformers", "optimum", "nncf"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # Tracing the models for OpenVINO warns about every data-dependent branch (dozens of lines);
    # they would bury a real error in the pod log and in the operator's failure event.
    try:
        from torch.jit import TracerWarning
    except ImportError:
        pass
    else:
        warnings.filterwarnings("ignore", category=TracerWarning)
    try:
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging
    except ImportError:
        return
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    try:  # optimum sets its own level when first imported, over the one set above
        from optimum.utils import logging as optimum_logging
    except ImportError:
        return
    optimum_logging.set_verbosity_error()


# --- export ----------------------------------------------------------------------------------


def export_openvino(
    source: str,
    output: Path,
    options: OpenVINOExportOptions,
    *,
    learned_embeds: Path | None = None,
    token: str | None = None,
    lora_weights: Path | None = None,
    revision: str | None = None,
    overwrite: bool = False,
    cache: Path | None = None,
) -> dict:
    """Export `source` (+ `learned_embeds`, or with `lora_weights` fused in) into `output`
    atomically; return the metadata. With `cache`, a base model (+ embeddings) is exported
    once into the cache and copied from there (export_cache.py); LoRA adapters change the UNet,
    so a LoRA is always exported in full."""
    from amxtune_trainer.export_cache import base_export, export_from_entry

    output = Path(output).absolute()
    created_parent = _make_parents(output.parent)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    started = time.perf_counter()
    try:
        tokens: list[str] = []
        target = staging / "openvino"
        cached = None
        if cache is not None and lora_weights is None and Path(source).is_dir():
            if learned_embeds is not None:
                check_embeddings(learned_embeds, token, source)
            cached = base_export(Path(cache).absolute(), Path(source), options)
            tokens = export_from_entry(cached, target, options, learned_embeds, token)
        else:
            convert_from = source
            if learned_embeds is not None:
                convert_from, tokens = pipeline_with_embeddings(
                    source, learned_embeds, token, revision, staging / "source"
                )
            elif lora_weights is not None:
                convert_from = pipeline_with_lora(source, lora_weights, revision,
                                                   staging / "source")
            changed = convert_from != source
            export_base(convert_from, target, options, revision=None if changed else revision)
        write_slow_tokenizer_files(target / "tokenizer")
        _check_tokens(target / "tokenizer", tokens)
        metadata = {
            "format": "amxtune-openvino-export/v1",
            "options": options.to_wire(),
            "source": source,
            "learned_embeds": str(learned_embeds) if learned_embeds else None,
            "lora_weights": str(lora_weights) if lora_weights else None,
            "placeholder_tokens": tokens,
            "static": True,
            "cache": cached.describe() if cached else None,
            "seconds": round(time.perf_counter() - started, 1),
            "weight_bytes": weight_bytes(target),
            "versions": library_versions(),
        }
        (target / EXPORT_METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        if output.exists():
            if not overwrite:
                raise UserError(f"{output} appeared during the export; not replacing it")
            output.rename(staging / "previous")
        target.rename(output)
        return metadata
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created_parent)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_base(source: str, target: Path, options: OpenVINOExportOptions, *,
                revision: str | None = None, plain_text_encoder: Path | None = None) -> None:
    """Convert `source` and save it static, in the weight format, into `target`; with
    `plain_text_encoder`, also save the text encoder there before its weights are compressed."""
    pipe = convert(source, revision=revision)
    make_static(pipe, options)
    if plain_text_encoder is not None:
        import openvino

        openvino.save_model(pipe.text_encoder.model, plain_text_encoder / "openvino_model.xml",
                            compress_to_fp16=False)
    set_weight_format(pipe, options)
    pipe.save_pretrained(str(target))


def _make_parents(folder: Path) -> Path | None:
    """mkdir -p `folder`; return the topmost folder created (to undo on failure), if any."""
    topmost = None
    for parent in [folder, *folder.parents][::-1]:
        if not parent.exists():
            topmost = topmost or parent
    folder.mkdir(parents=True, exist_ok=True)
    return topmost


def _remove_empty(topmost: Path | None) -> None:
    """Remove the folders `_make_parents` created, if they are still empty."""
    if topmost is None:
        return
    for folder in sorted((p for p in topmost.rglob("*") if p.is_dir()), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()
    with contextlib.suppress(OSError):
        topmost.rmdir()


def convert(source: str, revision: str | None = None):
    """optimum-intel conversion to an (uncompiled, dynamic) fp32 OVStableDiffusionPipeline."""
    from optimum.intel import OVStableDiffusionPipeline

    kwargs: dict = {"export": True, "compile": False, "load_in_8bit": False}
    if revision:
        kwargs["revision"] = revision
    try:
        return OVStableDiffusionPipeline.from_pretrained(source, **kwargs)
    except OSError as error:  # hub id not found / offline
        raise UserError(f"cannot load {source}: {str(error).splitlines()[0]}") from None


def apply_weight_format(model, weight_format: str):
    """An openvino.Model with its weights stored as `weight_format`; fp32 leaves it.

    Done after conversion, one model at a time, so that a cached base export's text encoder,
    given new tokens, goes through exactly what a fresh export's went through
    (export_cache.py). fp16 is optimum's `half()` transformation; int8 is NNCF's asymmetric
    8-bit per-channel compression of every layer, embeddings included (int8-full too, for every
    model but the UNet: see quantize_unet).
    """
    if weight_format == WeightFormat.fp32:
        return model
    if weight_format == WeightFormat.fp16:
        from openvino._offline_transformations import compress_model_transformation  # half()

        compress_model_transformation(model)
        return model
    import logging

    import nncf  # (3 s to import: only here, not in quiet_libraries)

    nncf.set_log_level(logging.ERROR)  # it sets its own level on import; no statistics table
    # and it draws a progress bar on stdout whatever its level: not in a pod log
    with contextlib.redirect_stdout(io.StringIO()):
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)


# Rendered at the export's shape to calibrate an int8-full UNet: everyday subjects (the UNet's
# activation ranges, not the learned token, are what calibration measures), in two calls of
# `batch_size` prompts, one UNet input per denoising step, so that the ranges span the whole
# noise schedule. 16 inputs: NNCF's statistics and bias correction take most of the time.
CALIBRATION_PROMPTS = ("a photo of a dog on the beach", "a red car in a city street at night",
                       "an oil painting of a house by a lake", "a portrait of a woman in a garden")
CALIBRATION_CALLS = 2
CALIBRATION_STEPS = 8


def quantize_unet(pipe, options: OpenVINOExportOptions) -> None:
    """Replace the static pipeline's UNet by one computing in int8, weights and activations
    (NNCF post-training quantization with optimum-intel's settings for a diffusion model: mixed
    preset, transformer model type, fast bias correction), calibrated on the UNet inputs of
    `CALIBRATION_CALLS` renders of `CALIBRATION_STEPS` steps at the export's shape."""
    import logging

    import nncf
    import numpy as np
    from optimum.intel.openvino.quantization import InferRequestWrapper

    nncf.set_log_level(logging.ERROR)
    samples: list[dict] = []
    pipe.compile()
    pipe.set_progress_bar_config(disable=True)  # not in a pod log
    pipe.unet.request = InferRequestWrapper(pipe.unet.request, samples)  # copies each input
    try:
        for call in range(CALIBRATION_CALLS):
            first = call * options.batch_size
            prompts = [CALIBRATION_PROMPTS[(first + i) % len(CALIBRATION_PROMPTS)]
                       for i in range(options.batch_size)]
            pipe(prompt=prompts, num_images_per_prompt=options.num_images_per_prompt,
                 height=options.height, width=options.width, guidance_scale=7.5,
                 num_inference_steps=CALIBRATION_STEPS, output_type="latent",
                 generator=np.random.RandomState(call))
    finally:
        pipe.unet.request = pipe.unet.request.request
    pipe.clear_requests()  # the compiled models' memory, before NNCF compiles its own
    with contextlib.redirect_stdout(io.StringIO()):  # progress bars: not in a pod log
        pipe.unet.model = nncf.quantize(
            pipe.unet.model, nncf.Dataset(samples), subset_size=len(samples),
            preset=nncf.QuantizationPreset.MIXED, model_type=nncf.ModelType.TRANSFORMER,
            fast_bias_correction=True)


def set_weight_format(pipe, options: OpenVINOExportOptions) -> None:
    """Store every model of the static pipeline's weights in `options.weight_format` (see
    apply_weight_format); the text encoder is folded first in every format (see
    text_encoder_in_format). For int8-full the UNet is quantized first, while the others are
    still as converted (its calibration renders with them), then left as quantized."""
    weight_format = options.weight_format
    if weight_format == WeightFormat.int8_full:
        quantize_unet(pipe, options)
    for name, component in pipe.components.items():
        if name == "unet" and weight_format == WeightFormat.int8_full:
            continue
        if name == "text_encoder":
            component.model = text_encoder_in_format(component.model, weight_format)
        elif getattr(component, "model", None) is not None:
            component.model = apply_weight_format(component.model, weight_format)
    pipe.clear_requests()


def text_encoder_in_format(model, weight_format: str):
    """The text encoder with constants folded, then its weights in `weight_format`.

    Folded first so that a token table that was extended by appending rows (a cached export
    given a textual inversion, export_cache.py) is one table again, and so that the same
    constants are compressed whether the rows were converted with the model or appended later
    (folding turns the position embedding's lookup into a constant, which is then not
    compressed, in both cases)."""
    from openvino.passes import ConstantFolding, Manager

    passes = Manager()
    passes.register_pass(ConstantFolding())
    passes.run_passes(model)
    return apply_weight_format(model, weight_format)


def make_static(pipe, options: OpenVINOExportOptions) -> None:
    """Reshape to the static shape (and fix the VAE decoder batch, see the module doc)."""
    pipe.reshape(
        batch_size=options.batch_size,
        height=options.height,
        width=options.width,
        num_images_per_prompt=options.num_images_per_prompt,
    )
    images = options.batch_size * options.num_images_per_prompt
    if images != options.num_images_per_prompt:
        pipe.vae_decoder.model = pipe._reshape_vae_decoder(
            pipe.vae_decoder.model, options.height, options.width, images
        )
        pipe.clear_requests()


def load_openvino_pipeline(folder: str | Path, *, precision: str = "auto", compile: bool = True):
    """Load an exported folder with its static shapes; `precision` is the CPU plugin's
    inference precision: 'auto' (plugin default: bf16 on AMX/AVX512-BF16 CPUs), 'fp32', 'bf16'."""
    from optimum.intel import OVStableDiffusionPipeline

    folder = Path(folder).absolute()
    check_openvino_folder(folder)
    ov_config = {}
    if precision != "auto":
        ov_config["INFERENCE_PRECISION_HINT"] = {"fp32": "f32", "bf16": "bf16"}[precision]
    pipe = OVStableDiffusionPipeline.from_pretrained(
        str(folder), export=False, dynamic_shapes=False, compile=False, ov_config=ov_config
    )
    if compile:
        pipe.compile()
    return pipe


def check_openvino_folder(folder: Path) -> None:
    if not (folder / "model_index.json").is_file() or not (
        folder / "unet" / "openvino_model.xml"
    ).is_file():
        raise UserError(
            f"{folder} is not an OpenVINO pipeline folder (no model_index.json and "
            "unet/openvino_model.xml); make one with `amxtune-train export-openvino`"
        )


def read_export_metadata(folder: Path) -> dict | None:
    path = Path(folder) / EXPORT_METADATA
    return json.loads(path.read_text()) if path.is_file() else None


def weight_bytes(folder: Path) -> dict[str, int]:
    """Size of each model's weights file, e.g. {'unet': ..., 'text_encoder': ...}."""
    return {
        path.parent.name: path.stat().st_size
        for path in sorted(Path(folder).glob("*/openvino_model.bin"))
    }


def _check_tokens(folder: Path, tokens: list[str]) -> None:
    if not tokens:
        return
    from transformers import CLIPTokenizer

    vocab = CLIPTokenizer.from_pretrained(str(folder)).get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        raise RuntimeError(f"exported tokenizer lost the placeholder token(s) {missing}")


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("optimum-intel", "openvino", "nncf", "diffusers", "transformers", "torch"):
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found
