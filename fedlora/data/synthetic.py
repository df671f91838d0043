"""The embedded default fleet: synthetic "device notes", generated, never downloaded.

What it is
    Short English notes and messages of the kind a phone user types to
    themselves ("Need to buy eggs and rice on the way home. Fingers crossed!
    cheers, Priya"). Text is produced from the templates and vocabularies of
    ten topics in :mod:`fedlora.data.topics` (food, fitness, work, travel,
    family, weather, entertainment, health, pets, home). It is small-vocabulary
    and regular, so a tiny model learns it in seconds on a CPU, yet it has real
    structure for federated fine-tuning to find.

Why it is non-IID (each device is one writer)
    * label skew: a device's topic mixture is drawn from Dirichlet(0.3) over
      the ten topics, so most devices write mainly about two or three of them;
      a record's ``label`` is the topic of that note.
    * quantity skew: a device's number of notes is log-normal (median 100,
      clipped to 40..300), times its device profile's ``data_scale``.
    * feature (style) skew: each writer has their own people, places and pet
      name, a greeting and a signature they use with their own probabilities,
      two favourite phrases, and some write all in lower case or with "!!".

The public split
    ``split="public"`` writes the same topics uniformly, with generic people
    and places ("a friend", "the park") and no greetings, signatures, phrases
    or personal names. It is what the default base model and its tokenizer are
    trained on, so they never see a private device text; the personal parts are
    what fine-tuning on the devices has to learn.

Deterministic: the same ``(num_devices, seed, split)`` gives the same records,
and device ``i`` is the same writer whatever ``num_devices`` is.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedlora.data import topics as T
from fedlora.data.records import Record
from fedlora.errors import ConfigError

# Bump when the generated text changes: it is part of the cached base model's key.
GENERATOR_VERSION = 1

TOPIC_ALPHA = 0.3
MEDIAN_NOTES = 100
NOTES_SIGMA = 0.6
MIN_NOTES, MAX_NOTES = 40, 300
PUBLIC_NOTES_PER_DEVICE = 100

_PRIVATE_STREAM, _PUBLIC_STREAM = 0, 1
_FORMATTER = string.Formatter()


@dataclass(frozen=True)
class _Writer:
    """Who writes a device's notes and how (the personal, non-IID part)."""

    topic_mix: np.ndarray
    people: tuple[str, ...]
    places: tuple[str, ...]
    pet_names: tuple[str, ...]
    greeting: str = ""
    greeting_p: float = 0.0
    signature: str = ""
    signature_p: float = 0.0
    phrases: tuple[str, ...] = ()
    phrase_p: float = 0.0
    lower_case: bool = False
    exclaims: bool = False


_PUBLIC_WRITER = _Writer(
    topic_mix=np.full(len(T.TOPICS), 1.0 / len(T.TOPICS)),
    people=T.PUBLIC_PEOPLE,
    places=T.PUBLIC_PLACES,
    pet_names=T.PUBLIC_PET_NAMES,
)


def default_records(
    num_devices: int = 20,
    seed: int = 0,
    split: Literal["private", "public"] = "private",
    *,
    num_records: int | None = None,
    scale: Callable[[str], float] | None = None,
) -> list[Record]:
    """Generate the embedded fleet (``private``) or its generic text (``public``).

    Private devices are named ``device-0000``.... The public split has device
    ``public`` and ``num_records`` notes (default ``100 * num_devices``).
    ``scale(device)`` multiplies a private device's number of notes (at least 2): its
    first notes are the same whatever the scale.
    """
    if isinstance(num_devices, bool) or not isinstance(num_devices, int) or num_devices < 1:
        raise ConfigError(f"num_devices must be a positive integer, got {num_devices!r}")
    if split == "private":
        return [r for i in range(num_devices) for r in device_notes(i, seed, scale)]
    if split == "public":
        count = PUBLIC_NOTES_PER_DEVICE * num_devices if num_records is None else num_records
        if count < 1:
            raise ConfigError(f"num_records must be positive, got {count}")
        rng = np.random.default_rng([seed, _PUBLIC_STREAM])
        return [_note(rng, _PUBLIC_WRITER, "public") for _ in range(count)]
    raise ConfigError(f"split must be 'private' or 'public', got {split!r}")


def device_name(index: int) -> str:
    """The id of the embedded fleet's device ``index``."""
    return f"device-{index:04d}"


def device_notes(
    index: int, seed: int = 0, scale: Callable[[str], float] | None = None
) -> list[Record]:
    """The notes of the embedded fleet's device ``index`` alone (as in :func:`default_records`)."""
    rng, writer, count = _device_writer(index, seed, scale)
    device = device_name(index)
    return [_note(rng, writer, device) for _ in range(count)]


def device_note_count(
    index: int, seed: int = 0, scale: Callable[[str], float] | None = None
) -> int:
    """How many notes device ``index`` has, without writing them."""
    return _device_writer(index, seed, scale)[2]


def _device_writer(
    index: int, seed: int, scale: Callable[[str], float] | None
) -> tuple[np.random.Generator, _Writer, int]:
    rng = np.random.default_rng([seed, _PRIVATE_STREAM, index])
    writer = _make_writer(rng)
    count = int(
        np.clip(round(rng.lognormal(np.log(MEDIAN_NOTES), NOTES_SIGMA)), MIN_NOTES, MAX_NOTES)
    )
    if scale is not None:
        count = max(2, round(count * scale(device_name(index))))
    return rng, writer, count


def _make_writer(rng: np.random.Generator) -> _Writer:
    people = _sample(rng, T.PRIVATE_PEOPLE, int(rng.integers(3, 6)) + 1)
    owner, friends = people[0], people[1:]
    signature = _pick(rng, T.SIGNATURES).format(owner=owner, initial=owner[0])
    return _Writer(
        topic_mix=rng.dirichlet(np.full(len(T.TOPICS), TOPIC_ALPHA)),
        people=friends,
        places=_sample(rng, T.PRIVATE_PLACES, int(rng.integers(2, 4))),
        pet_names=(_pick(rng, T.PRIVATE_PET_NAMES),),
        greeting=_pick(rng, T.GREETINGS),
        greeting_p=float(rng.uniform(0.1, 0.7)),
        signature=signature,
        signature_p=float(rng.uniform(0.2, 0.9)),
        phrases=_sample(rng, T.PHRASES, 2),
        phrase_p=float(rng.uniform(0.1, 0.5)),
        lower_case=bool(rng.random() < 0.2),
        exclaims=bool(rng.random() < 0.2),
    )


def _note(rng: np.random.Generator, writer: _Writer, device: str) -> Record:
    topic = T.TOPICS[int(rng.choice(len(T.TOPICS), p=writer.topic_mix))]
    count = int(rng.choice(3, p=[0.5, 0.35, 0.15])) + 1
    parts = [_sentence(rng, topic, writer) for _ in range(count)]
    if writer.exclaims:
        parts = [p[:-1] + "!!" if p.endswith(".") else p for p in parts]
    if writer.phrases and rng.random() < writer.phrase_p:
        phrase = _pick(rng, writer.phrases)
        parts.append(phrase[0].upper() + phrase[1:] + ("!" if rng.random() < 0.5 else "."))
    if writer.greeting and rng.random() < writer.greeting_p:
        parts.insert(0, writer.greeting)
    if writer.signature and rng.random() < writer.signature_p:
        parts.append(writer.signature)
    text = " ".join(parts)
    return Record(device=device, text=text.lower() if writer.lower_case else text, label=topic.name)


def _sentence(rng: np.random.Generator, topic: T.Topic, writer: _Writer) -> str:
    template = _pick(rng, topic.templates)
    context = {
        "person": writer.people,
        "place": writer.places,
        "pet_name": writer.pet_names,
        "day": T.DAYS,
        "time": T.TIMES,
        "num": T.NUMBERS,
    }
    values: dict[str, str] = {}
    for _, field, _, _ in _FORMATTER.parse(template):
        if field is None or field in values:
            continue
        base = field.rstrip("0123456789")
        pool = topic.slots.get(base) or context[base]
        taken = {values[f] for f in values if f.rstrip("0123456789") == base}
        choices = [v for v in pool if v not in taken] or list(pool)
        values[field] = _pick(rng, choices)
    text = template.format_map(values)
    return text[0].upper() + text[1:]


def _pick(rng: np.random.Generator, pool: tuple[str, ...] | list[str]) -> str:
    return pool[int(rng.integers(len(pool)))]


def _sample(rng: np.random.Generator, pool: tuple[str, ...], k: int) -> tuple[str, ...]:
    return tuple(pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False))
