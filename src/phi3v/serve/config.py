"""The server's settings: what it loads, where it listens, and the limits a request must keep."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ServeConfig:
    """``phi3v serve`` settings (each limit refuses a request with a 4xx that names the field).

    Attributes:
        model: Base model directory (official format, with processor files).
        adapters: ``{name: PEFT adapter directory}``, each served under its name beside the base.
        model_name: The base's name in ``/v1/models`` and the ``model`` field (default: its directory's name).
        host: Interface to bind; 127.0.0.1 keeps the server local.
        port: TCP port (0 picks a free one).
        api_key: When set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
        allow_local_files: Accept ``file://`` image URLs (files the server process can read).
        num_crops: Override the processor's ``num_crops``.
        dtype: Weights' dtype (default: as saved).
        device: cpu, cuda, cuda:1 ...
        max_body_bytes: Largest request body.
        max_image_bytes: Largest encoded image.
        max_image_pixels: Largest image (width x height), checked before decoding.
        max_images: Most images in one request.
        max_prompt_tokens: Most prompt tokens (images included).
        max_tokens: Most tokens one answer may ask for.
        default_max_tokens: ``max_tokens`` when a request gives none.
        default_temperature: ``temperature`` when a request gives none; 0 (greedy) by default, unlike OpenAI's 1.
        max_batch_size: Most requests generated together.
        batch_wait_ms: How long the first queued request waits for others to join its batch.
    """

    model: str
    adapters: dict[str, str] = field(default_factory=dict)
    model_name: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    allow_local_files: bool = False
    num_crops: int | None = None
    dtype: str | None = None
    device: str | None = None
    max_body_bytes: int = 20_000_000
    max_image_bytes: int = 10_000_000
    max_image_pixels: int = 40_000_000
    max_images: int = 8
    max_prompt_tokens: int = 16_384
    max_tokens: int = 2048
    default_max_tokens: int = 256
    default_temperature: float = 0.0
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0

    def __post_init__(self) -> None:
        problems = []
        for name in ("max_body_bytes", "max_image_bytes", "max_image_pixels", "max_images", "max_prompt_tokens",
                     "max_tokens", "default_max_tokens", "max_batch_size"):  # fmt: skip
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.default_max_tokens > self.max_tokens:
            problems.append(f"default_max_tokens {self.default_max_tokens} exceeds max_tokens {self.max_tokens}")
        if not 0 <= self.default_temperature <= 2:
            problems.append(f"default_temperature must be from 0 to 2, got {self.default_temperature}")
        if not 0 <= self.port < 65536:
            problems.append(f"port must be from 0 to 65535, got {self.port}")
        if self.batch_wait_ms < 0:
            problems.append(f"batch_wait_ms must be at least 0, got {self.batch_wait_ms}")
        if self.api_key == "":
            problems.append("api_key must not be empty (leave it unset for no key)")
        for name in self.adapters:
            if not name or name == self.base_name:
                problems.append(
                    f"adapter name {name!r} must be non-empty and differ from the base's {self.base_name!r}"
                )
        if problems:
            raise ValueError("serve settings: " + "; ".join(problems))

    @property
    def base_name(self) -> str:
        from pathlib import Path

        return self.model_name or Path(self.model).resolve().name or "base"
