"""`amxtune-train textual-inversion`: learn a new token's embedding, on one rank or many.

Only the new token's vectors are a parameter (embedding.SplicedEmbedding): the frozen
embedding table, text encoder and UNet never change. Prompts are the diffusers script's
templates ("a photo of a {}"), or the images' captions with the token in them.
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

CONCEPT_PROMPT = "a photo of a {}"


def configure_parser(parser: argparse.ArgumentParser) -> None:
    options.configure_parser(parser, TextualInversion.METHOD)


def run(args: argparse.Namespace) -> int:
    return run_recipe(args, TextualInversion)


class TextualInversion(Trainer):
    METHOD = "textual-inversion"

    def __init__(self, config, info, cpus: list | None = None):
        super().__init__(config, info, cpus)
        self.ti = config.textual_inversion

    def check_model(self, components):
        from amxtune_trainer import embedding

        ti, tokenizer = self.ti, components.tokenizer
        init_ids = None
        if not ti.initial_embedding:
            init_ids = embedding.initializer_ids(tokenizer, ti.initializer_token)
        new_ids = embedding.add_placeholder_tokens(tokenizer, ti.placeholder_token,
                                                   ti.num_vectors)
        weight = components.text_encoder.get_input_embeddings().weight
        if ti.initial_embedding:
            vectors = embedding.read_embedding_file(ti.initial_embedding, ti.num_vectors,
                                                    weight.shape[1])
        else:
            vectors = embedding.initial_vectors(weight, init_ids, ti.num_vectors)
        return new_ids, vectors

    def check_resume(self, state: dict, resume: Path | None) -> None:
        method = state.get("method", self.METHOD)  # older checkpoints: textual inversion
        if method != self.METHOD:
            raise UserError(f"checkpoint {resume or 'on rank 0'} was made for {method}, not "
                            f"for textual inversion; use another output folder")
        saved = (state.get("placeholder_token"), state.get("num_vectors"))
        if saved != (self.ti.placeholder_token, self.ti.num_vectors):
            raise UserError(
                f"checkpoint {resume or 'on rank 0'} learns {saved[0]!r} with {saved[1]} "
                f"vectors, not {self.ti.placeholder_token!r} with {self.ti.num_vectors}"
            )

    def attach(self, checked, state: dict | None) -> list:
        from amxtune_trainer import embedding
        from amxtune_trainer.data import templates_for

        new_ids, init_vectors = checked
        initial = init_vectors
        if state is not None:
            init_vectors = state["vectors"]
            initial = state.get("initial_vectors")  # older checkpoints did not keep it
        # what the token started from, for the "before" row of the concept similarity
        self.initial_vectors = None if initial is None else initial.detach().float().clone()
        self.token_text = embedding.token_text(self.ti.placeholder_token, self.ti.num_vectors)
        self.templates = templates_for(self.ti.learnable_property)
        self.embedding = embedding.splice(self.text_encoder, new_ids, init_vectors)
        self.vectors = self.embedding.vectors
        return [self.vectors]

    def train_prompts(self, indices: list[int], rng: random.Random) -> list[str]:
        from amxtune_trainer.data import make_prompt

        return [make_prompt(i, self.latents.captions, self.templates, self.token_text, rng)
                for i in indices]

    def eval_prompts(self, indices: list[int]) -> list[str]:
        from amxtune_trainer.data import caption_prompt

        captions = self.latents.captions
        return [caption_prompt(captions[i], self.token_text) if captions[i] is not None
                else self.templates[0].format(self.token_text) for i in indices]

    def method_state(self) -> dict:
        return {
            "vectors": self.vectors.detach().clone(),
            "initial_vectors": self.initial_vectors,
            "placeholder_token": self.ti.placeholder_token,
            "num_vectors": self.ti.num_vectors,
        }

    def write_weights(self, folder: Path) -> None:
        from amxtune_trainer import outputs

        outputs.write_embeds(folder / outputs.EMBEDS_FILE, self.ti.placeholder_token,
                             self.vectors)

    def periodic_outputs(self, step: int) -> None:
        from amxtune_trainer import outputs

        outputs.write_embeds(self.output_dir / f"learned_embeds-steps-{step}.safetensors",
                             self.ti.placeholder_token, self.vectors)

    def final_outputs(self) -> dict:
        from amxtune_trainer import outputs

        placeholder, out = self.ti.placeholder_token, self.output_dir
        embeds = outputs.write_embeds(out / outputs.EMBEDS_FILE, placeholder, self.vectors)
        outputs.write_embedding_single_file(out / outputs.EMBEDDING_SINGLE_FILE, placeholder,
                                            self.vectors, self.step)
        if self.opt.save_a1111:
            outputs.write_a1111(out / outputs.A1111_FILE, placeholder, self.vectors, self.step)
        if self.opt.save_as_full_pipeline:
            outputs.save_full_pipeline(
                self.model_path, out / outputs.PIPELINE_DIR,
                lambda pipeline: pipeline.load_textual_inversion(str(embeds), token=placeholder),
            )
        return {"learned_embeds": str(embeds.resolve())}

    @contextlib.contextmanager
    def _vectors_set_to(self, values):
        learned = self.vectors.detach().clone()
        self.vectors.data.copy_(values)
        try:
            yield
        finally:
            self.vectors.data.copy_(learned)

    def concept_rows(self) -> dict:
        concept = CONCEPT_PROMPT.format(self.ti.placeholder_token)
        rows = {"learned": (concept, contextlib.nullcontext())}
        if self.initial_vectors is not None:
            rows["before"] = (concept, self._vectors_set_to(self.initial_vectors))
        if self.ti.initializer_token and not self.ti.initial_embedding:
            rows["initializer"] = (CONCEPT_PROMPT.format(self.ti.initializer_token),
                                   contextlib.nullcontext())
        return rows

    def method_metrics(self) -> dict:
        return {"placeholder_tokens": self.token_text.split()}
