"""Cost in USD from token counts: genai-prices' bundled data, overridable by a user price file.

Override file (TOML or JSON), prices in USD per million tokens::

    [models."gpt-4o-mini"]
    input = 0.15
    cached_input = 0.075   # optional, defaults to input
    output = 0.60
    batch_input = 0.075    # optional, defaults to 50 % of input (and so on)
    image_input = 10.0     # optional: input image tokens (image edits), defaults to input

    [models."sora-2"]      # a video model: USD per second of video, by size (batch_per_second: optional)
    per_second = { "720x1280" = 0.10, "1280x720" = 0.10 }

    [models."dall-e-3"]    # an image model billed per image, by size or quality/size (batch_per_image: optional)
    per_image = { "1024x1024" = 0.04, "hd/1024x1024" = 0.08 }

An unknown model costs ``None``, never 0; a free one (moderations) costs 0, with or without usage.
"""

from __future__ import annotations

import logging
import threading
import tomllib
import warnings
from dataclasses import dataclass
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson

from velvet_core.parsing.extract import Images, Tokens, Video, images_of, video_of

log = logging.getLogger(__name__)

BATCH_DISCOUNT = Decimal("0.5")
_M = Decimal(1_000_000)
_M1 = 1_000_000  # tokens: a model whose million tokens cost nothing is free


class PriceFileError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class UnitRate:
    """USD per unit (a second of video, an image) by size as the API writes it (``720x1280``); for images, a
    ``QUALITY/SIZE`` key (``hd/1024x1024``) comes before the size alone."""

    by_size: dict[str, Decimal]
    source: str
    date: str


# Video models genai-prices lacks (they bill per second of video, by resolution). Small on purpose: a price
# file's entry of the same name replaces one (``per_second``); the batch rate is half, as for every model.
# The rates are OpenAI's as announced on the date given; they could not be checked against the page from where this
# was written (no network): a team billed otherwise sets its own with velvet_prices.
VIDEO_PRICES: dict[str, UnitRate] = {
    "sora-2": UnitRate({"720x1280": Decimal("0.10"), "1280x720": Decimal("0.10")},
                        "https://platform.openai.com/docs/pricing", "2025-10-06"),
    "sora-2-pro": UnitRate({"720x1280": Decimal("0.30"), "1280x720": Decimal("0.30"),
                             "1024x1792": Decimal("0.50"), "1792x1024": Decimal("0.50")},
                            "https://platform.openai.com/docs/pricing", "2025-10-06"),
}


@dataclass(frozen=True, slots=True)
class Rate:
    """USD per million tokens."""

    input: Decimal
    output: Decimal
    cached_input: Decimal
    image_input: Decimal | None = None  # None: as ``input``

    def cost(self, t: Tokens) -> Decimal:
        cached = min(t.cached or 0, t.input or 0)
        image = min(t.image or 0, (t.input or 0) - cached)
        image_rate = self.input if self.image_input is None else self.image_input
        return (
            (Decimal((t.input or 0) - cached - image) * self.input + Decimal(cached) * self.cached_input
             + Decimal(image) * image_rate + Decimal(t.output or 0) * self.output) / _M
        )

    @property
    def free(self) -> bool:
        return not (self.input or self.output or self.cached_input or self.image_input)


def _per_unit(name: str, spec: Any, p: Path, unit: str) -> tuple[UnitRate, UnitRate]:
    def table(key: str) -> dict[str, Decimal]:
        t = spec[key]
        if not isinstance(t, dict) or not t:
            raise PriceFileError(f"{p}: model {name!r}: {key!r} must be a table of sizes")
        try:
            return {str(k): Decimal(str(v)) for k, v in t.items() if not isinstance(v, bool)}
        except ArithmeticError as e:
            raise PriceFileError(f"{p}: model {name!r}: {key!r} needs numbers ({e})") from e

    live = table(unit)
    batch = table(f"batch_{unit}") if f"batch_{unit}" in spec else {k: v * BATCH_DISCOUNT for k, v in live.items()}
    return UnitRate(live, str(p), "price file"), UnitRate(batch, str(p), "price file")


def load_price_file(path: str | Path) -> dict[str, tuple[Rate, Rate]]:
    """Parse an override file into ``{model: (sync rate, batch rate)}`` (with its video models:
    :meth:`Pricer.from_file`)."""
    return _load(path)[0]


Units = dict[str, tuple[UnitRate, UnitRate]]  # model -> (live, batch)


def _load(path: str | Path) -> tuple[dict[str, tuple[Rate, Rate]], Units, Units]:
    p = Path(path).expanduser()
    try:
        raw = p.read_bytes()
        data = orjson.loads(raw) if p.suffix == ".json" else tomllib.loads(raw.decode())
    except (OSError, ValueError) as e:
        raise PriceFileError(f"cannot read price file {p}: {e}") from e
    models = data.get("models", data) if isinstance(data, dict) else None
    if not isinstance(models, dict):
        raise PriceFileError(f"{p}: expected a table of models")
    out: dict[str, tuple[Rate, Rate]] = {}
    videos: Units = {}
    images: Units = {}
    for name, spec in models.items():
        if isinstance(spec, dict) and "per_second" in spec:
            videos[name] = _per_unit(name, spec, p, "per_second")
            continue
        if isinstance(spec, dict) and "per_image" in spec:
            images[name] = _per_unit(name, spec, p, "per_image")
            continue
        try:
            inp, outp = Decimal(str(spec["input"])), Decimal(str(spec["output"]))
            cached = Decimal(str(spec.get("cached_input", spec["input"])))
            image = Decimal(str(spec.get("image_input", spec["input"])))

            def b(key: str, base: Decimal, spec: dict = spec) -> Decimal:
                return Decimal(str(spec[key])) if key in spec else base * BATCH_DISCOUNT

            out[name] = (Rate(inp, outp, cached, image),
                         Rate(b("batch_input", inp), b("batch_output", outp), b("batch_cached_input", cached),
                              b("batch_image_input", image)))
        except (KeyError, TypeError, ArithmeticError) as e:
            raise PriceFileError(f"{p}: model {name!r} needs numeric 'input' and 'output' ({e})") from e
    return out, videos, images


class Pricer:
    """Thread-safe cost calculator."""

    def __init__(self, overrides: dict[str, tuple[Rate, Rate]] | None = None,
                 videos: Units | None = None, images: Units | None = None) -> None:
        self.overrides = overrides or {}
        half = {k: UnitRate({s: r * BATCH_DISCOUNT for s, r in v.by_size.items()}, v.source, v.date)
                for k, v in VIDEO_PRICES.items()}
        self.videos = {**{k: (v, half[k]) for k, v in VIDEO_PRICES.items()}, **(videos or {})}
        self.images = images or {}  # models billed per image come from a price file (gpt-image-1: by tokens)
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str | Path | None) -> Pricer:
        """A pricer with the user's price file (``velvet_prices``), if any."""
        if not path:
            return cls()
        rates, videos, images = _load(path)
        return cls(rates, videos, images)

    def video_cost(self, model: str | None, video: Video | None, *, batch: bool = False) -> float | None:
        """A video job's USD cost: its seconds at its model's rate for its size (None when either is unknown)."""
        if not model or video is None:
            return None
        rates = _by_name(self.videos, model)
        rate = None if rates is None or video.size is None else rates[1 if batch else 0].by_size.get(video.size)
        return None if rate is None else float(video.seconds * rate)

    def image_cost(self, model: str | None, images: Images | None, *, batch: bool = False) -> float | None:
        """An ImagesResponse's USD cost at its model's per-image rate for its quality and size (None when the
        model has no per-image rate or the size none)."""
        rates = _by_name(self.images, model) if model else None
        if rates is None or images is None:
            return None
        by_size = rates[1 if batch else 0].by_size
        rate = by_size.get(f"{images.quality}/{images.size}", by_size.get(images.size))
        return None if rate is None else float(images.count * rate)

    def is_per_image(self, model: str | None) -> bool:
        return bool(model) and _by_name(self.images, model or "") is not None

    def is_video(self, model: str | None) -> bool:
        return bool(model) and _by_name(self.videos, model or "") is not None

    @staticmethod
    def warm() -> None:
        """Import the price data now (about 0.3 s of CPU) rather than during the first priced call."""
        import genai_prices  # noqa: F401

    def cost(self, model: str | None, tokens: Tokens, *, batch: bool = False,
             service_tier: str | None = None) -> float | None:
        """USD cost, or None when the model, or the token counts of a model that is not free, are unknown."""
        if not model:
            return None
        rate = self._override(model, batch)
        if tokens.input is None and tokens.output is None:  # (moderations report no usage: they are free)
            if rate is not None:
                return 0.0 if rate.free else None
            with self._lock:
                return 0.0 if _genai_cost(model, _M1, 0, _M1, batch, service_tier, 0) == 0 else None
        if rate is not None:
            return float(rate.cost(tokens))
        with self._lock:
            return _genai_cost(model, tokens.input or 0, tokens.cached or 0, tokens.output or 0,
                               batch, service_tier, tokens.image or 0)

    def line_cost(self, row: dict[str, Any]) -> float | None:
        """A batch result line's cost, at the batch rate, from its row (model and token columns; a video job's
        seconds and size from its body)."""
        model = row.get("model")
        video, per_image = self.is_video(model), self.is_per_image(model)
        if not (video or per_image):
            return self.cost(model, Tokens.of_row(row), batch=True)
        try:
            body = orjson.loads(row["body"]) if row.get("body") else None
        except orjson.JSONDecodeError:
            body = None
        if video:
            return self.video_cost(model, video_of(body), batch=True)
        return self.image_cost(model, images_of(body), batch=True)

    def _override(self, model: str, batch: bool) -> Rate | None:
        rates = _by_name(self.overrides, model)
        return None if rates is None else rates[1 if batch else 0]


def _by_name(table: dict[str, Any], model: str) -> Any:
    found = table.get(model)
    if found is None:  # dated snapshot "gpt-4o-mini-2024-07-18" -> "gpt-4o-mini"
        for name, r in table.items():
            if model.startswith(name + "-") and (found is None or len(name) > len(found[0])):
                found = (name, r)
        return None if found is None else found[1]
    return found


@lru_cache(maxsize=65536)
def _genai_cost(model: str, inp: int, cached: int, out: int, batch: bool,
                tier: str | None, image: int = 0) -> float | None:
    import genai_prices

    cached = min(cached, inp)
    usage = genai_prices.Usage(input_tokens=inp, cache_read_tokens=cached, output_tokens=out,
                               **({"input_image_tokens": min(image, inp - cached)} if image else {}))
    ctx = {"service_tier": tier} if tier and tier not in ("auto", "default") else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base = genai_prices.calc_price(usage, model, provider_id="openai", price_context=ctx)
            if not batch:
                return float(base.total_price)
            calc = genai_prices.calc_price(usage, model, provider_id="openai",
                                           price_context={**(ctx or {}), "processing": "batch"})
    except LookupError:
        return None
    except Exception:  # price data bugs must not lose the row
        log.warning("velvet: pricing %s failed", model, exc_info=True)
        return None
    if calc.model_price == base.model_price:  # no batch price in the data: the documented 50 %
        return float(calc.total_price * BATCH_DISCOUNT)
    return float(calc.total_price)
