"""Images rendered during and after training (rank 0), with whatever the recipe trained in
place: validation images, and the concept-similarity rows (before / initializer / learned)."""

from __future__ import annotations

from pathlib import Path


def render(trainer, prompt: str, count: int, seed: int) -> list:
    """`count` images of `prompt` with the networks as they are now (same seed, same images)."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=trainer.vae, text_encoder=trainer.text_encoder, tokenizer=trainer.tokenizer,
        unet=trainer.unet, scheduler=DPMSolverMultistepScheduler.from_config(
            trainer.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    # The pipeline itself stands the placeholder for all its vectors ("<tok>" -> "<tok>
    # <tok>_1 ..."), as it does for loaded embeddings; a prompt expanded beforehand would be
    # expanded again into stray tokens.
    images = []
    with torch.no_grad(), trainer._autocast():
        for _ in range(count):
            result = pipeline(
                prompt, num_inference_steps=trainer.opt.validation_inference_steps,
                generator=generator, height=trainer.opt.resolution, width=trainer.opt.resolution,
            )
            images.append(result.images[0])
    return images


def validation_images(trainer, step: int) -> list[Path]:
    """Render the validation prompt into validation/step-N/ (images and a grid)."""
    from amxtune_trainer import outputs
    from amxtune_trainer.images import make_grid

    images = render(trainer, trainer.opt.validation_prompt, trainer.opt.num_validation_images,
                    trainer.seed)
    folder = trainer.output_dir / outputs.VALIDATION_DIR / f"step-{step}"
    paths = [outputs.write_png(folder / f"image-{i}.png", im) for i, im in enumerate(images)]
    paths.append(outputs.write_png(folder / "grid.png", make_grid(images)))
    return paths


def concept_similarity(trainer) -> dict:
    """How much the recipe's concept prompt looks like the training images before and after
    training (and, for textual inversion, the initializer word alone), same seeds for every
    row; writes the rows into concept_samples.png."""
    import numpy as np
    from PIL import Image

    from amxtune_trainer import outputs
    from amxtune_trainer.images import make_grid
    from amxtune_trainer.toyworld.similarity import concept_similarity as score

    count = trainer.opt.concept_similarity_images
    references = [Image.fromarray(((p.transpose(1, 2, 0) + 1) * 127.5).clip(0, 255)
                                  .astype(np.uint8)) for p in trainer.concept.pixels]
    rows = trainer.concept_rows()
    rendered = {}
    for name, (prompt, state) in rows.items():
        with state:
            rendered[name] = render(trainer, prompt, count, trainer.seed)
    result: dict = {"prompt": rows["learned"][0], "images_per_prompt": count}
    for name, images in rendered.items():
        result[name] = round(score(images, references), 4)
    order = [name for name in ("before", "initializer", "learned") if name in rendered]
    result["rows_of_concept_samples_png"] = order
    grid = make_grid([image for name in order for image in rendered[name]], columns=count)
    outputs.write_png(trainer.output_dir / outputs.CONCEPT_SAMPLES, grid)
    return result
