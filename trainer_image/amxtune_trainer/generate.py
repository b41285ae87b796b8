"""`amxtune-train generate`: render prompts with an exported OpenVINO pipeline (or, to compare,
a PyTorch one) and write each PNG, grid.png and generation.json into the output folder.

The OpenVINO pipeline keeps the static shape it was exported with: prompts are rendered in
groups of its batch size, so their number must be a multiple of it. Call k (prompts
k*batch .. k*batch+batch-1) draws its initial noise from a torch generator seeded with seed + k,
the same way for both backends, so that the backends can be compared image for image.

generation.json: the settings used, every image's file, prompt and seed, and the timing:
`seconds_per_image` is the wall time of the pipeline calls divided by the number of images
(loading and compiling are reported separately as `load_seconds`).

Nothing is written until the inputs have been checked and every image rendered; the folder is
then moved into place in one rename.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from amxtune_api.export import GenerationOptions, OpenVINOExportOptions, check_prompts_fill_batches
from amxtune_trainer.errors import UserError
from amxtune_trainer.export import quiet_libraries
from amxtune_trainer.model_flags import add_model_flags, model_from_args, values_from_args

METADATA_NAME = "generation.json"
GRID_NAME = "grid.png"
SHAPE_FIELDS = ("batch_size", "height", "width", "num_images_per_prompt")
PYTORCH_DEFAULT_SHAPE = {"batch_size": 1, "height": 512, "width": 512, "num_images_per_prompt": 1}


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        required=True,
        help="For --backend openvino: a folder made by `export-openvino`. For --backend "
        "pytorch: a diffusers pipeline folder, hub id or built-in model ('toyworld', 'tiny', "
        "'sd15-arch').",
    )
    parser.add_argument(
        "--backend", choices=["openvino", "pytorch"], default="openvino",
        help="Runtime (default: openvino).",
    )
    parser.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="Compute precision. PyTorch: fp32, or bf16 autocast (AMX); auto = fp32. "
        "OpenVINO: the CPU plugin's inference precision; auto = the plugin's default, which "
        "is bf16 on CPUs with AMX/AVX512-BF16 and fp32 elsewhere (default: auto).",
    )
    parser.add_argument(
        "--learned-embeds",
        "--learned_embeds",
        dest="learned_embeds",
        help="PyTorch backend: learned_embeds.safetensors to add to --model first.",
    )
    parser.add_argument(
        "--output", "-o", required=True, help="Folder for the PNGs, grid.png and generation.json."
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace --output if it exists and is not empty."
    )
    what = parser.add_argument_group("what to render")
    add_model_flags(what, GenerationOptions)
    what.add_argument("--baseline-token", "--baseline_token", metavar="TOKEN",
                      help="With --baseline-text: also render each prompt with TOKEN replaced "
                      "by TEXT (e.g. the initializer word), from the same seeds")
    what.add_argument("--baseline-text", "--baseline_text", metavar="TEXT")
    what.add_argument("--concept-dir", "--concept_dir", metavar="DIR", type=Path,
                      help="Score how much each prompt's images (and the baseline's) look like "
                      "the images in DIR, into generation.json's concept_similarity (toy-world "
                      "image statistics: meaningful for the built-in toyworld model)")
    shape = parser.add_argument_group(
        "shape",
        "OpenVINO: default and only allowed values are the exported static shape. "
        "PyTorch: default batch 1, 512x512, 1 image per prompt.",
    )
    add_model_flags(shape, OpenVINOExportOptions, exclude=["weight_format"])


@dataclass
class Rendered:
    images: list = field(default_factory=list)  # PIL images (or arrays with output_type="np")
    records: list[dict] = field(default_factory=list)  # file-independent facts per image
    batch_seconds: list[float] = field(default_factory=list)

    @property
    def seconds_per_image(self) -> float:
        return sum(self.batch_seconds) / max(1, len(self.records))


def run(args: argparse.Namespace) -> int:
    quiet_libraries()
    if bool(args.baseline_token) != bool(args.baseline_text):
        raise UserError("--baseline-token and --baseline-text go together")
    extra = ({"baseline": {"token": args.baseline_token, "text": args.baseline_text}}
             if args.baseline_token else {})
    options = model_from_args(GenerationOptions, args, **extra)
    requested_shape = {
        k: v for k, v in values_from_args(OpenVINOExportOptions, args).items() if k in SHAPE_FIELDS
    }
    if requested_shape:  # bounds and multiples of 8, with the model's own messages
        model_from_args(OpenVINOExportOptions, args)
    output = Path(args.output).expanduser().absolute()
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not args.overwrite:
        raise UserError(f"--output {output} exists and is not empty; pass --overwrite to replace")
    if args.concept_dir is not None:
        concept_images(args.concept_dir)  # before anything is rendered
    if args.learned_embeds and args.backend != "pytorch":
        raise UserError(
            "--learned-embeds is for --backend pytorch; an OpenVINO export already holds the token"
        )

    metadata = generate_samples(
        args.model,
        output,
        options,
        backend=args.backend,
        precision=args.precision,
        requested_shape=requested_shape,
        learned_embeds=args.learned_embeds,
        overwrite=args.overwrite,
        concept_dir=args.concept_dir,
    )
    print(
        f"rendered {metadata['num_images']} image(s) with {args.backend} "
        f"({metadata['precision']}) in "
        f"{metadata['seconds_total']:.2f} s, {metadata['seconds_per_image']:.3f} s/image; "
        f"wrote {output}",
        flush=True,
    )
    if "concept_similarity" in metadata:
        scores = metadata["concept_similarity"]
        baseline = (f", baseline {scores['baseline']:.2f}" if "baseline" in scores else "")
        print(f"concept similarity to {args.concept_dir} (0 to 1): images "
              f"{scores['images']:.2f}{baseline}", flush=True)
    return 0


def generate_samples(
    model: str | Path,
    output: Path,
    options: GenerationOptions,
    *,
    backend: str = "openvino",
    precision: str = "auto",
    requested_shape: dict | None = None,
    learned_embeds: str | None = None,
    overwrite: bool = False,
    concept_dir: Path | None = None,
) -> dict:
    """Load `model`, render `options.prompts`, write the samples folder; return its metadata
    (generation.json's content)."""
    requested_precision = precision
    requested_shape = requested_shape or {}
    started = time.perf_counter()
    if backend == "openvino":
        from amxtune_trainer.export import check_openvino_folder, load_openvino_pipeline

        folder = Path(model).expanduser().absolute()
        check_openvino_folder(folder)
        model_name = str(folder)
        pipe = load_openvino_pipeline(folder, precision=requested_precision, compile=False)
        shape = openvino_static_shape(pipe)
        for name, value in requested_shape.items():
            if shape[name] != -1 and value != shape[name]:
                raise UserError(
                    f"--{name.replace('_', '-')} {value} does not match the exported static "
                    f"shape ({name} {shape[name]}); re-export with that shape"
                )
        shape = {name: requested_shape.get(name, value) for name, value in shape.items()}
        if -1 in shape.values():
            shape = {k: (PYTORCH_DEFAULT_SHAPE[k] if v == -1 else v) for k, v in shape.items()}
        _check_batches(options, shape)
        pipe.compile()
        precision = openvino_precision(pipe)
    else:
        shape = {**PYTORCH_DEFAULT_SHAPE, **requested_shape}
        _check_batches(options, shape)
        pipe = load_pytorch_pipeline(model, learned_embeds)
        model_name = str(model)
        precision = "bf16" if requested_precision == "bf16" else "fp32"
    load_seconds = time.perf_counter() - started

    rendered = render(pipe, options, shape, backend=backend, precision=precision)
    baseline = None
    if options.baseline is not None:
        token, text = options.baseline.token, options.baseline.text
        replaced = [prompt.replace(token, text) for prompt in options.prompts]
        baseline = render(pipe, options.model_copy(update={"prompts": replaced}), shape,
                          backend=backend, precision=precision)
    metadata = {
        "backend": backend,
        "precision": precision,
        "model": model_name,
        "learned_embeds": learned_embeds,
        "settings": options.to_wire(),
        "shape": shape,
        "num_images": len(rendered.records),
        "seconds_per_image": round(rendered.seconds_per_image, 4),
        "seconds_total": round(sum(rendered.batch_seconds), 4),
        "batch_seconds": [round(s, 4) for s in rendered.batch_seconds],
        "load_seconds": round(load_seconds, 3),
        "machine": machine_info(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if concept_dir is not None:
        metadata["concept_similarity"] = score_concept(concept_dir, rendered, baseline)
    return write_samples(output, rendered, metadata, overwrite=overwrite, baseline=baseline)


def concept_images(concept_dir: Path) -> list:
    """The images in `concept_dir` (the training data's extensions), or a UserError."""
    from PIL import Image

    from amxtune_api.training import TrainingOptions
    from amxtune_trainer.data import find_images

    folder = Path(concept_dir)
    paths = find_images(folder, TrainingOptions().image_extensions) if folder.is_dir() else []
    if not paths:
        raise UserError(f"--concept-dir {concept_dir}: no images there")
    return [Image.open(path).convert("RGB") for path in paths]


def score_concept(concept_dir: Path, rendered: Rendered, baseline: Rendered | None) -> dict:
    """Concept similarity (toyworld.similarity) of all images, of the baseline's, and per
    prompt, against the images in `concept_dir`."""
    from amxtune_trainer.toyworld.similarity import concept_similarity

    references = concept_images(concept_dir)
    result: dict = {"concept_dir": str(concept_dir),
                    "images": round(concept_similarity(rendered.images, references), 4)}
    if baseline is not None:
        result["baseline"] = round(concept_similarity(baseline.images, references), 4)
    per_prompt: dict[str, list] = {}
    for index, record in enumerate(rendered.records):
        per_prompt.setdefault(record["prompt"], []).append(index)
    result["prompts"] = [
        {"prompt": prompt,
         "images": round(concept_similarity([rendered.images[i] for i in indices],
                                            references), 4),
         **({"baseline": round(concept_similarity([baseline.images[i] for i in indices],
                                                  references), 4)} if baseline else {})}
        for prompt, indices in per_prompt.items()]
    return result


def _check_batches(options: GenerationOptions, shape: dict) -> None:
    try:
        check_prompts_fill_batches(len(options.prompts), shape["batch_size"])
    except ValueError as error:
        raise UserError(f"--prompt: {error}") from None


def openvino_static_shape(pipe) -> dict:
    """batch_size, height, width, num_images_per_prompt of a loaded OpenVINO pipeline (-1:
    dynamic), read from the models' input shapes."""
    text_batch = pipe.text_encoder.model.inputs[0].get_partial_shape()[0]
    unet_batch = pipe.batch_size  # 2 (guidance) x batch_size x num_images_per_prompt
    batch = -1 if text_batch.is_dynamic else text_batch.get_length()
    per_prompt = -1 if -1 in (batch, unet_batch) else unet_batch // (2 * batch)
    return {
        "batch_size": batch,
        "height": pipe.height,
        "width": pipe.width,
        "num_images_per_prompt": per_prompt,
    }


def openvino_precision(pipe) -> str:
    """The inference precision the CPU plugin chose for the compiled UNet: 'fp32' or 'bf16'."""
    hint = pipe.unet.request.get_property("INFERENCE_PRECISION_HINT")
    name = str(hint.get_type_name() if hasattr(hint, "get_type_name") else hint)
    return {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(name, name)


def load_pytorch_pipeline(model: str, learned_embeds: str | None = None):
    import torch
    from diffusers import StableDiffusionPipeline

    from amxtune_trainer.export_sources import resolve_embeddings, resolve_model

    source = resolve_model(model)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source, torch_dtype=torch.float32, safety_checker=None, requires_safety_checker=False,
            local_files_only=Path(source).is_absolute(),
        )
    except OSError as error:
        raise UserError(f"cannot load {model}: {str(error).splitlines()[0]}") from None
    if learned_embeds:
        try:
            pipe.load_textual_inversion(str(resolve_embeddings(learned_embeds)))
        except ValueError as error:
            raise UserError(f"cannot add {learned_embeds} to {model}: {error}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(
    pipe,
    options: GenerationOptions,
    shape: dict,
    *,
    backend: str,
    precision: str = "fp32",
    latents=None,
    output_type: str = "pil",
) -> Rendered:
    """Render all prompts in groups of shape['batch_size']; `latents` (optional) replaces the
    seeded initial noise of every call (shape [batch*images_per_prompt, 4, h/8, w/8])."""
    import torch

    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    batch = shape["batch_size"]
    per_prompt = shape["num_images_per_prompt"]
    autocast = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if backend == "pytorch" and precision == "bf16"
        else contextlib.nullcontext()
    )
    result = Rendered()
    for call, start in enumerate(range(0, len(options.prompts), batch)):
        prompts = options.prompts[start:start + batch]
        seed = options.seed + call
        kwargs = {
            "prompt": prompts,
            "num_inference_steps": options.num_inference_steps,
            "guidance_scale": options.guidance_scale,
            "height": shape["height"],
            "width": shape["width"],
            "num_images_per_prompt": per_prompt,
            "generator": torch.Generator("cpu").manual_seed(seed),
            "output_type": output_type,
        }
        if options.negative_prompt:
            kwargs["negative_prompt"] = [options.negative_prompt] * len(prompts)
        if latents is not None:
            kwargs["latents"] = latents
        begin = time.perf_counter()
        with torch.inference_mode(), autocast:
            images = pipe(**kwargs).images
        result.batch_seconds.append(time.perf_counter() - begin)
        for offset, image in enumerate(images):
            result.images.append(image)
            result.records.append(
                {
                    "prompt": prompts[offset // per_prompt],
                    "prompt_index": start + offset // per_prompt,
                    "image_of_prompt": offset % per_prompt,
                    "call": call,
                    "seed": seed,
                }
            )
    return result


def write_samples(output: Path, rendered: Rendered, metadata: dict, overwrite: bool,
                  baseline: Rendered | None = None) -> dict:
    """PNGs, grid.png and generation.json, written beside `output` and renamed into place.
    With a `baseline` rendering, each baseline image sits left of its result in the grid."""
    from amxtune_trainer.images import make_grid, slug

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        target = staging / "samples"
        target.mkdir()
        images = []
        for index, (image, record) in enumerate(
            zip(rendered.images, rendered.records, strict=True)
        ):
            name = f"{index:03d}-{slug(record['prompt'])}.png"
            image.save(target / name)
            record["file"] = name
            if baseline is not None:
                before = baseline.records[index]
                before["file"] = f"{index:03d}-baseline-{slug(before['prompt'])}.png"
                baseline.images[index].save(target / before["file"])
                record["baseline"] = before
                images.append(baseline.images[index])
            images.append(image)
        per_prompt = metadata["shape"]["num_images_per_prompt"]
        if baseline is not None:
            settings = metadata["settings"]["baseline"]
            grid = make_grid(images, columns=2, labels=[settings["text"], settings["token"]],
                             min_size=128)
        else:
            grid = make_grid(images, columns=per_prompt if per_prompt > 1 else None)
        grid.save(target / GRID_NAME)
        metadata = {**metadata, "images": rendered.records, "grid": GRID_NAME}
        (target / METADATA_NAME).write_text(json.dumps(metadata, indent=2) + "\n")
        if output.exists():
            if not overwrite and (not output.is_dir() or any(output.iterdir())):
                raise UserError(f"{output} appeared while rendering; not replacing it")
            output.rename(staging / "previous")
        target.rename(output)
        return metadata
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def machine_info() -> dict:
    info = {"cpus": os.cpu_count(), "platform": platform.platform()}
    with contextlib.suppress(OSError):
        info["loadavg"] = [round(x, 2) for x in os.getloadavg()]
    return info
