"""Every message podsrl processes exchange, as typed frozen dataclasses.

Scalars travel in a msgpack header; arrays travel as raw little-endian frames described by
``ARRAYS`` (dtype, ndim). :mod:`protocol.codec` turns these into frames and back, strictly:
a payload either decodes into one of these types with every invariant of :meth:`check` true,
or raises :class:`ProtocolError`. Change ``PROTOCOL_VERSION`` with any change to this file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

PROTOCOL_VERSION = 9  # 8: WeightsRequest.base_model (LoRA: the base travels once); 9: ScoredEpisodes

I32, I64, F32, U8 = np.dtype("<i4"), np.dtype("<i8"), np.dtype("<f4"), np.dtype("u1")


WEIGHTS_ALIGN = 64  # bytes; every tensor of a Weights buffer starts at a multiple of this
_SAFE_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")  # a file name, never a path
_CUDA_WIRE = re.compile(r"[0-9a-z;]{0,1024}")  # protocol/cuda_ipc.py parses it; this bounds it
SERVER_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:@/-]{0,63}")  # short and printable: it is logged and keyed on
_LABEL = re.compile(r"[ -~]{0,255}")  # printable ASCII (host names, engine and task names)
MAX_VERSION = 2**53  # far beyond any run; keeps version arithmetic exact in int64 and float64
MAX_SESSION = 2**63 - 1
MAX_CHUNKS = 2**31  # chunks of one weights transfer
ANNOUNCE_EVERY_S = 1.0  # the learner repeats its latest announcement this often (learner/publisher.py)
LEARNER_SILENT_S = 3.0  # no announcement for this long: the learner is gone (killed, restarting, unreachable)
HEARTBEAT_STATES = frozenset({"generating", "waiting_for_weights", "loading_weights", "evaluating", "waiting_for_work"})
MAX_PROMPTS = 1 << 12  # prompts of one work request or grant
MAX_GROUP_SIZE = 1 << 12  # completions of one group (a grant's n)
MAX_LEASE_S = 3600.0
MAX_TURNS = 1 << 10  # model turns of one episode (ScoredEpisodes.turns); the run's own bound is task.max_turns
# why the selector refuses a rollout server for good (Refusal.reason; also its rejection counter's key)
REFUSALS = frozenset({"server_id_in_use", "id_mismatch"})


def new_session() -> int:
    """A fresh random 63-bit identity for this process (rollout servers' groups, the learner's announcements)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def _int(v: Any) -> bool:
    return type(v) is int


def _number(v: Any) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


class ProtocolError(ValueError):
    """A payload that is not a valid message. ``reason`` is a short counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _invariant(detail: str) -> ProtocolError:
    """The error of a failed ``check``; callers test first and format ``detail`` only on failure."""
    return ProtocolError("invariant", detail)


def _check_server_id(server_id: str) -> None:
    if not SERVER_ID.fullmatch(server_id):
        raise _invariant(
            f"server_id {server_id[:40]!r}{'...' if len(server_id) > 40 else ''} "
            "must be 1-64 characters of [A-Za-z0-9_.:@/-]"
        )


def _check_label(what: str, value: str) -> None:
    if not _LABEL.fullmatch(value):
        raise _invariant(f"{what} must be at most 255 printable ASCII characters")


def _check_version(what: str, version: int, low: int = 0) -> None:
    if not low <= version <= MAX_VERSION:
        raise _invariant(f"{what} {version} outside {low}..2**53")


def _ragged(flat: np.ndarray, lens: np.ndarray, what: str) -> None:
    """``flat`` is the concatenation of rows whose lengths are ``lens``."""
    if lens.shape[0] <= 64:  # a few Python ints beat two numpy reductions (~1 us each); sums are exact both ways
        items = lens.tolist()
        if items and min(items) < 0:
            raise _invariant(f"{what}: negative lengths")
        total = sum(items)
    else:
        if int(lens.min()) < 0:
            raise _invariant(f"{what}: negative lengths")
        total = int(lens.sum())
    if total != flat.shape[0]:
        raise _invariant(f"{what}: lengths sum {total} != {flat.shape[0]} items")


class Message:
    """Base of all messages. ``ARRAYS`` maps array fields to (dtype, ndim)."""

    TYPE: ClassVar[str]
    ARRAYS: ClassVar[dict[str, tuple[np.dtype, int]]] = {}

    def check(self) -> None:
        """Cross-field invariants; raise ProtocolError. Field types are checked by the codec."""


@dataclass(frozen=True)
class Hello(Message):
    """A rollout server announces itself to the selector when it (re)joins."""

    TYPE: ClassVar[str] = "hello"
    server_id: str
    host: str
    pid: int
    engine: str
    session: int = 0  # random per process: tells a restarted server, or a second one with the same id

    def check(self) -> None:
        _check_server_id(self.server_id)
        _check_label("host", self.host)
        _check_label("engine", self.engine)
        if not (0 <= self.session <= MAX_SESSION and 0 <= self.pid < 2**32):
            raise _invariant("session and pid must be non-negative 64- and 32-bit integers")


@dataclass(frozen=True)
class Heartbeat(Message):
    """A rollout server is alive; sent on the group channel every ``heartbeat_s``."""

    TYPE: ClassVar[str] = "heartbeat"
    server_id: str
    version: int  # -1 before the first weights
    groups_sent: int
    state: str  # one of HEARTBEAT_STATES
    session: int = 0

    def check(self) -> None:
        _check_server_id(self.server_id)
        _check_version("version", self.version, low=-1)
        if self.state not in HEARTBEAT_STATES:
            raise _invariant(f"state {self.state[:40]!r} is not one of {sorted(HEARTBEAT_STATES)}")
        if not (0 <= self.session <= MAX_SESSION and self.groups_sent >= 0):
            raise _invariant("session and groups_sent must be non-negative 64-bit integers")


@dataclass(frozen=True)
class ScoredGroup(Message):
    """The n completions of one prompt, sampled with policy ``version``, scored by the task's verifier."""

    TYPE: ClassVar[str] = "scored_group"
    ARRAYS: ClassVar[dict[str, tuple[np.dtype, int]]] = {
        "prompt_ids": (I32, 1),
        "completion_ids": (I32, 1),  # n completions concatenated
        "completion_lens": (I32, 1),  # [n]
        "logprobs": (F32, 1),  # behaviour log-prob of each completion token
        "rewards": (F32, 1),  # [n]
    }
    server_id: str
    session: int  # random per rollout-server process; (server_id, session, group_id) names a group
    group_id: int  # sequence number within the session: 0, 1, 2, ...
    version: int
    task: str
    gen_seconds: float
    prompt_ids: np.ndarray
    completion_ids: np.ndarray
    completion_lens: np.ndarray
    logprobs: np.ndarray
    rewards: np.ndarray

    @property
    def n(self) -> int:
        return int(self.rewards.shape[0])

    def check(self) -> None:
        """What holds for any run. The run's own bounds (vocabulary, lengths, group size, log-prob
        floor, reward range, versions published so far) are the selector's ``selector/bounds.py``."""
        _check_server_id(self.server_id)
        _check_version("version", self.version)
        _check_label("task", self.task)
        if not (0 <= self.session <= MAX_SESSION and 0 <= self.group_id <= MAX_SESSION and self.gen_seconds >= 0):
            raise _invariant("session, group_id and gen_seconds must be non-negative")
        if self.prompt_ids.shape[0] <= 0:
            raise _invariant("empty prompt")
        n = self.rewards.shape[0]
        if self.completion_lens.shape[0] != n:
            raise _invariant("completion_lens and rewards differ in length")
        if n <= 0:
            raise _invariant("a group needs at least one completion")
        _ragged(self.completion_ids, self.completion_lens, "completion_ids")
        logprobs = self.logprobs
        if logprobs.shape != self.completion_ids.shape:
            raise _invariant("logprobs and completion_ids differ in length")
        # max() <= 1e-4 is False for a NaN too (and the codec has rejected NaN before check() runs)
        if not (logprobs.size == 0 or logprobs.max() <= 1e-4):
            raise _invariant("log-probs must be <= 0")


@dataclass(frozen=True)
class ScoredEpisodes(ScoredGroup):
    """A group of n multi-turn episodes of one prompt (DESIGN.md, "Groups"): each episode is one token
    sequence in ``completion_ids``, the model's own sampled tokens and the environment's (tool results,
    observations) in the order they happened. ``loss_mask`` marks each token: 1 the model produced it,
    0 the environment did (it never enters a loss, a KL, an entropy or a token count). The behaviour
    log-prob of an environment token is exactly 0 (it was not sampled). ``turns``: the model turns of
    each episode, 1..MAX_TURNS. A group of single-turn completions stays a ``ScoredGroup`` (its mask is
    all ones): nothing of this type costs it anything."""

    TYPE: ClassVar[str] = "scored_episodes"
    ARRAYS: ClassVar[dict[str, tuple[np.dtype, int]]] = {
        **ScoredGroup.ARRAYS,
        "loss_mask": (U8, 1),  # one per completion token: 1 model, 0 environment
        "turns": (I32, 1),  # [n]
    }
    loss_mask: np.ndarray
    turns: np.ndarray

    def check(self) -> None:
        super().check()
        mask = self.loss_mask
        if mask.shape != self.completion_ids.shape:
            raise _invariant(
                f"loss_mask has {mask.shape[0]} entries for {self.completion_ids.shape[0]} completion tokens"
            )
        if self.turns.shape[0] != self.n:
            raise _invariant("turns and rewards differ in length")
        if not (int(self.turns.min()) >= 1 and int(self.turns.max()) <= MAX_TURNS):
            raise _invariant(f"turns must be in 1..{MAX_TURNS}")
        if mask.size and int(mask.max()) > 1:
            raise _invariant("loss_mask must be 0 (environment token) or 1 (model token)")
        if mask.size and bool(np.any(self.logprobs[mask == 0])):
            raise _invariant("the log-prob of an environment token (loss_mask 0) must be 0")
        lens = self.completion_lens
        if int(lens.min()) < 1:
            raise _invariant("an episode has at least one model token")
        model = np.add.reduceat(mask, np.cumsum(lens) - lens, dtype=np.int64)  # each segment non-empty
        if int(model.min()) < 1:
            raise _invariant("an episode whose tokens are all masked (no model token) trains nothing")


@dataclass(frozen=True)
class BatchRequest(Message):
    """The learner (rank 0) asks the selector for the batch that makes version ``version + 1``.

    ``session`` is the session the learner announces (``WeightsAnnouncement.session``): the selector
    serves only requests from the announced learner, so a third process that does not know it gets no
    batch (docs/RELIABILITY.md, "Batch requests")."""

    TYPE: ClassVar[str] = "batch_request"
    request_id: int
    version: int
    num_groups: int
    session: int = 0  # the learner's announced session

    def check(self) -> None:
        _check_version("version", self.version)
        if not 0 < self.num_groups <= 1 << 16:
            raise _invariant(f"num_groups must be in 1..65536, got {self.num_groups}")
        if not 0 <= self.session <= MAX_SESSION:
            raise _invariant("session must be a non-negative 63-bit integer")


@dataclass(frozen=True)
class TrainBatch(Message):
    """Down-sampled, advantage-annotated samples for one optimizer step (one row per completion)."""

    TYPE: ClassVar[str] = "train_batch"
    ARRAYS: ClassVar[dict[str, tuple[np.dtype, int]]] = {
        "prompt_ids": (I32, 1),
        "prompt_lens": (I32, 1),  # [B]
        "completion_ids": (I32, 1),
        "completion_lens": (I32, 1),  # [B]
        "logprobs": (F32, 1),
        "advantages": (F32, 1),  # [B]
        "rewards": (F32, 1),  # [B]
        "versions": (I64, 1),  # [B] policy version that generated each row
        "group_index": (I32, 1),  # [B] which group of this batch a row came from
        "server_index": (I32, 1),  # [B] index into ``servers``
        "group_sessions": (I64, 1),  # [G] each group's (session, seq): with its server, the group's identity
        "group_seqs": (I64, 1),  # [G]
        "loss_mask": (U8, 1),  # empty: every completion token counts; else one per token (ScoredEpisodes)
    }
    request_id: int
    version: int  # learner version the batch was assembled for
    servers: list
    stats: dict  # selector counters since the previous batch (str -> number)
    prompt_ids: np.ndarray
    prompt_lens: np.ndarray
    completion_ids: np.ndarray
    completion_lens: np.ndarray
    logprobs: np.ndarray
    advantages: np.ndarray
    rewards: np.ndarray
    versions: np.ndarray
    group_index: np.ndarray
    server_index: np.ndarray
    group_sessions: np.ndarray
    group_seqs: np.ndarray
    loss_mask: np.ndarray = field(default_factory=lambda: np.empty(0, U8))

    @property
    def size(self) -> int:
        return int(self.prompt_lens.shape[0])

    def check(self) -> None:
        _check_version("version", self.version)
        b = self.size
        for name in ("completion_lens", "advantages", "rewards", "versions", "group_index", "server_index"):
            rows = getattr(self, name).shape[0]
            if rows != b:
                raise _invariant(f"{name} has {rows} rows, expected {b}")
        _ragged(self.prompt_ids, self.prompt_lens, "prompt_ids")
        _ragged(self.completion_ids, self.completion_lens, "completion_ids")
        if self.logprobs.shape != self.completion_ids.shape:
            raise _invariant("logprobs and completion_ids differ in length")
        if self.loss_mask.size and self.loss_mask.shape != self.completion_ids.shape:
            raise _invariant("loss_mask must be empty or hold one entry per completion token")
        if self.loss_mask.size and int(self.loss_mask.max()) > 1:
            raise _invariant("loss_mask must be 0 or 1")
        for s in self.servers:
            if not isinstance(s, str):
                raise _invariant("servers must be strings")
        if b and (int(self.server_index.min()) < 0 or int(self.server_index.max()) >= len(self.servers)):
            raise _invariant("server_index out of range")
        groups = int(self.group_index.max()) + 1 if b else 0
        if b and int(self.group_index.min()) < 0:
            raise _invariant("group_index must be non-negative")
        if self.group_sessions.shape[0] != groups or self.group_seqs.shape[0] != groups:
            raise _invariant(f"group_sessions and group_seqs need one entry per group ({groups})")
        if b and (int(self.versions.min()) < 0 or int(self.versions.max()) > self.version):
            raise _invariant(f"row versions must be in 0..{self.version} (staleness is never negative)")
        for k, v in self.stats.items():
            if not (isinstance(k, str) and _number(v)):
                raise _invariant("stats must map str to finite numbers")


@dataclass(frozen=True)
class WeightsAnnouncement(Message):
    """Published by the learner after each new version; ``final`` tells everyone the run is over.

    ``shm`` names the version's shared-memory segment (``protocol/shm.py``) and ``host`` the machine it
    lives on (``protocol.shm.host_id``): a rollout server on that machine maps it instead of fetching it
    over the network. Both are empty when the learner offers no segment. ``cuda`` is the version's
    CUDA IPC handle (``protocol/cuda_ipc.py``) when a learner on CUDA shares a device copy, else empty.
    ``manifest`` is the version's manifest digest (``protocol.weights.manifest_digest``: xxh3-64 of its
    per-tensor digests, computed by the learner from the bytes it packed), so that what a server reads
    (a segment any local process could write, a network copy) is checked against what the learner said,
    never against itself; 0: not said (a segment is then never used)."""

    TYPE: ClassVar[str] = "weights_announcement"
    version: int
    final: bool
    nbytes: int = 0  # the version's raw size
    floor: int = 0  # no row of a version below this is trained: a restarted learner discarded those weights
    vocab_size: int = 0  # the model's; every token id a rollout server sends must be below it (0: unknown)
    session: int = 0  # random per learner process: a new one means the learner restarted
    shm: str = ""
    host: str = ""
    cuda: str = ""
    manifest: int = 0

    def check(self) -> None:
        _check_version("version", self.version)
        _check_version("floor", self.floor)
        if not (_int(self.manifest) and 0 <= self.manifest < 2**64):
            raise _invariant("manifest must be a 64-bit digest")
        if self.floor > self.version or self.vocab_size < 0 or self.nbytes < 0 or not 0 <= self.session <= MAX_SESSION:
            raise _invariant("floor <= version, vocab_size >= 0, nbytes >= 0 and a 63-bit session required")
        if self.shm and not _SAFE_FILE.fullmatch(self.shm):
            raise _invariant("shm must be a plain file name")
        if not _CUDA_WIRE.fullmatch(self.cuda):
            raise _invariant("cuda must be a CUDA IPC handle's text (at most 1024 of [0-9a-z;])")
        _check_label("host", self.host)


@dataclass(frozen=True)
class WeightsRequest(Message):
    """A rollout server asks for one chunk of a version; ``version = -1`` means the latest.

    ``have``: the version the server holds (-1: none), so the reply can be a delta from it.
    ``chunk``: which chunk of the reply's payload (0 first; its reply says how many there are); the
    later chunks of one transfer name the version and base that chunk 0 announced. ``fetch``: the
    server's id of this transfer, echoed in every reply, so a reply to an abandoned transfer is
    recognised. ``with_files``: chunk 0 also carries the tokenizer files (a server asks once, on
    joining). A server keeps at most ``weights.window`` chunk requests in flight: that is the
    weights link's flow control (learner/publisher.py). ``corrupt``: a version whose shared-memory
    segment did not match its announced manifest on this server (-1: none), so that the learner stops
    serving that segment's bytes (it re-packs the version from its own state) and stops offering shared
    memory. ``base_model``: the request is for the base model a LoRA run's adapters apply to
    (docs/LORA.md), not for a version; it is served like a full version 0 (``version`` and ``have`` -1),
    to a server whose own ``model.path`` does not hold that base."""

    TYPE: ClassVar[str] = "weights_request"
    version: int
    have: int = -1
    with_files: bool = False
    chunk: int = 0
    fetch: int = 0
    corrupt: int = -1
    base_model: bool = False

    def check(self) -> None:
        _check_version("version", self.version, low=-1)
        _check_version("have", self.have, low=-1)
        _check_version("corrupt", self.corrupt, low=-1)
        if not (0 <= self.chunk < MAX_CHUNKS and 0 <= self.fetch <= MAX_SESSION):
            raise _invariant(f"chunk must be in 0..{MAX_CHUNKS - 1} and fetch a 63-bit id")


def _check_manifest(tensors: list, nbytes: int) -> None:
    """``[name, dtype, shape, offset, nbytes, xxh3_64]`` entries, aligned, in order, covering ``nbytes``."""
    end = 0
    for entry in tensors:
        if not (isinstance(entry, list) and len(entry) == 6):
            raise _invariant(f"bad tensor entry {str(entry)[:80]}")
        name, dtype, shape, offset, size, digest = entry
        if not (
            isinstance(name, str)
            and isinstance(dtype, str)
            and isinstance(shape, list)
            and all(_int(d) and d >= 0 for d in shape)
            and _int(offset)
            and _int(size)
            and _int(digest)
            and 0 <= digest < 2**64
        ):
            raise _invariant(f"bad tensor entry {str(entry)[:80]}")
        if not (offset >= end and offset % WEIGHTS_ALIGN == 0 and size >= 0):
            raise _invariant(f"tensor {name}: offset {offset} overlaps the previous tensor or is not aligned")
        end = offset + size
    if not end <= nbytes < end + WEIGHTS_ALIGN:
        raise _invariant(f"manifest covers {end} bytes, buffer has {nbytes}")


def _check_files(files: list, nbytes: int) -> None:
    total = 0
    for entry in files:
        if not (
            isinstance(entry, list)
            and len(entry) == 2
            and isinstance(entry[0], str)
            and _SAFE_FILE.fullmatch(entry[0])
            and _int(entry[1])
            and entry[1] >= 0
        ):
            raise _invariant(f"bad file entry {str(entry)[:80]}: [plain file name, nbytes] expected")
        total += entry[1]
    if total != nbytes:
        raise _invariant(f"files cover {total} bytes, file_data has {nbytes}")


@dataclass(frozen=True)
class Weights(Message):
    """A complete policy version: one contiguous byte buffer and the manifest to slice it.

    ``tensors`` is a list of ``[name, torch_dtype, shape, offset, nbytes, xxh3_64]`` in buffer order,
    every offset a multiple of ``WEIGHTS_ALIGN`` (so each tensor can be viewed in place), each with the
    xxh3-64 digest of its bytes (checked before a version is loaded: ``protocol.weights.verify``);
    ``model_config`` is the transformers config as JSON, and ``files`` (``[name, nbytes]`` in order)
    slices ``file_data`` into the tokenizer's files, so a rollout server on any machine can build the
    model and its tokenizer with no files of its own. A version travels as ``WeightsChunk`` messages
    (whole or as a delta) or through shared memory, and is reassembled into this type.
    """

    TYPE: ClassVar[str] = "weights"
    ARRAYS: ClassVar[dict[str, tuple[np.dtype, int]]] = {"data": (U8, 1), "file_data": (U8, 1)}
    version: int
    model_config: str
    tensors: list
    files: list
    data: np.ndarray = field(repr=False)
    file_data: np.ndarray = field(default_factory=lambda: np.empty(0, U8), repr=False)

    def check(self) -> None:
        _check_version("version", self.version)
        _check_files(self.files, self.file_data.shape[0])
        _check_manifest(self.tensors, self.data.shape[0])


WEIGHT_ENCODINGS = ("raw", "diff+zstd")


@dataclass(frozen=True)
class WeightsChunk(Message):
    """One chunk of a version in transfer: the reply to a ``WeightsRequest``.

    The payload (``size`` bytes in ``chunks`` chunks of ``chunk_bytes``, the last one shorter) is the
    version's raw buffer (``base = -1``, ``encoding = "raw"``) or its delta from version ``base``
    (``"diff+zstd"``, protocol/weights.py: exact for any dtype; both versions have the same manifest
    layout). Chunk 0 also carries the manifest (``tensors``, with the digests of
    the *target* version), ``model_config`` and, if asked, the files. ``status = "gone"``: the
    publisher no longer keeps the version or base asked for; start again from the latest.
    """

    TYPE: ClassVar[str] = "weights_chunk"
    ARRAYS: ClassVar[dict[str, tuple[np.dtype, int]]] = {"data": (U8, 1), "file_data": (U8, 1)}
    fetch: int
    version: int
    status: str
    base: int = -1
    encoding: str = "raw"
    chunk: int = 0
    chunks: int = 1
    chunk_bytes: int = 0
    size: int = 0
    raw_bytes: int = 0  # the version's raw size (the delta's decompressed size)
    model_config: str = ""
    tensors: list = field(default_factory=list)
    files: list = field(default_factory=list)
    data: np.ndarray = field(default_factory=lambda: np.empty(0, U8), repr=False)
    file_data: np.ndarray = field(default_factory=lambda: np.empty(0, U8), repr=False)

    def check(self) -> None:
        _check_version("version", self.version)
        _check_version("base", self.base, low=-1)
        if self.status not in ("ok", "gone") or self.encoding not in WEIGHT_ENCODINGS:
            raise _invariant(f"status must be ok or gone and encoding one of {WEIGHT_ENCODINGS}")
        if not 0 <= self.fetch <= MAX_SESSION:
            raise _invariant("fetch must be a 63-bit id")
        if self.status == "gone":
            return
        if not (self.base < self.version and (self.base == -1) == (self.encoding == "raw")):
            raise _invariant("a full version has base -1 and encoding raw; a delta's base is below its version")
        if not (
            0 <= self.chunk < self.chunks <= MAX_CHUNKS
            and self.size >= 0
            and self.raw_bytes >= 0
            and self.chunk_bytes > 0
            and self.size <= self.chunk_bytes * self.chunks
        ):
            raise _invariant("chunk < chunks, sizes >= 0 and chunks x chunk_bytes covering size required")
        if self.data.shape[0] != min(self.chunk_bytes, self.size - self.chunk * self.chunk_bytes):
            raise _invariant(f"chunk {self.chunk} has {self.data.shape[0]} bytes, the layout says otherwise")
        if self.encoding == "raw" and self.size != self.raw_bytes:
            raise _invariant("a raw payload is as large as the version")
        _check_files(self.files, self.file_data.shape[0])
        if self.chunk == 0:
            _check_manifest(self.tensors, self.raw_bytes)
        elif self.tensors or self.files or self.model_config:
            raise _invariant("only chunk 0 carries the manifest, the config and the files")


@dataclass(frozen=True)
class WorkRequest(Message):
    """A rollout server asks the selector for work (``rollout.pacing = "credits"``) before an engine call,
    on the groups link. ``version`` is the version its engine runs and will generate with."""

    TYPE: ClassVar[str] = "work_request"
    server_id: str
    session: int
    request_id: int
    version: int
    prompts: int  # wanted: at most rollout.prompts_per_call

    def check(self) -> None:
        _check_server_id(self.server_id)
        _check_version("version", self.version)
        if not (0 <= self.session <= MAX_SESSION and 0 <= self.request_id <= MAX_SESSION):
            raise _invariant("session and request_id must be non-negative 64-bit integers")
        if not 0 < self.prompts <= MAX_PROMPTS:
            raise _invariant(f"prompts must be in 1..{MAX_PROMPTS}, got {self.prompts}")


@dataclass(frozen=True)
class WorkGrant(Message):
    """The selector's answer to a WorkRequest: sample ``prompts`` groups of ``group_size`` completions
    and deliver them within ``lease_s``, after which the selector gives the capacity to others."""

    TYPE: ClassVar[str] = "work_grant"
    request_id: int
    prompts: int
    group_size: int
    lease_s: float

    def check(self) -> None:
        if not (
            0 <= self.request_id <= MAX_SESSION
            and 0 < self.prompts <= MAX_PROMPTS
            and 0 < self.group_size <= MAX_GROUP_SIZE
            and 0 < self.lease_s <= MAX_LEASE_S
        ):
            raise _invariant(
                f"a grant needs prompts in 1..{MAX_PROMPTS}, group_size in 1..{MAX_GROUP_SIZE} and "
                f"lease_s in (0, {MAX_LEASE_S:g}]"
            )


@dataclass(frozen=True)
class Refusal(Message):
    """The selector's answer, on the groups link, to a rollout server it refuses for good: ``reason`` is
    one of ``REFUSALS`` (``server_id_in_use``: another live process holds ``server_id``;
    ``id_mismatch``: the peer's key was made for another id) and ``detail`` names the other holder or the
    key's id. The rollout server stops, naming the fix. A WorkGrant cannot say this: a server with
    ``rollout.pacing = "free"`` asks for no work, and a grant's invariants are those of work."""

    TYPE: ClassVar[str] = "refusal"
    server_id: str  # the id refused, as the refused process sent it
    reason: str
    detail: str

    def check(self) -> None:
        _check_server_id(self.server_id)
        if self.reason not in REFUSALS:
            raise _invariant(f"refusal reason {self.reason[:40]!r} is not one of {sorted(REFUSALS)}")
        _check_label("detail", self.detail)


MESSAGES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Heartbeat,
        ScoredGroup,
        ScoredEpisodes,
        WorkRequest,
        WorkGrant,
        Refusal,
        BatchRequest,
        TrainBatch,
        WeightsAnnouncement,
        WeightsRequest,
        Weights,
        WeightsChunk,
    )
}


def scalar_fields(cls: type[Message]) -> dict[str, Any]:
    """Name -> Python type of every non-array field (the annotation strings are resolved here)."""
    kinds = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict}
    return {f.name: kinds[str(f.type)] for f in dataclasses.fields(cls) if f.name not in cls.ARRAYS}  # type: ignore[arg-type]
