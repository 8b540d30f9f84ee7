"""The typed run configuration: one TOML file per run, every key overridable as ``section.key=value``.

Every process parses the same file and reads its own section. Unknown keys are errors. The full
reference with defaults is ``docs/CONFIG.md``; ``configs/tiny.toml`` is the default run.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunConfig(Section):
    dir: str = Field("runs/tiny", description="run directory: metrics, checkpoints, model, logs")
    seed: int = Field(0, description="base seed; each process derives its own from it")
    steps: int = Field(
        600,
        ge=1,
        description="updates (= policy versions) to train: one per batch, each learner.ppo_epochs x "
        "learner.minibatches optimizer steps (1 by default)",
    )
    max_seconds: float = Field(
        0.0,
        ge=0,
        description="also stop training after this many seconds (0 = no limit); for equal wall-clock comparisons",
    )
    resume: bool = Field(True, description="continue from the run directory's latest checkpoint if there is one")
    staleness_mode: Literal["bounded", "exact"] = Field(
        "bounded",
        description="'bounded': train rows of staleness 0..max_staleness (production); 'exact': every "
        "update trains rows generated exactly max_staleness versions earlier (the first max_staleness updates "
        "train version-0 rows), to measure the effect of staleness itself (docs/STALENESS.md)",
    )
    fork_server: bool = Field(
        True,
        description="podsrl run: fork the selector, a one-rank learner and torch-engine rollout servers from "
        "one process that imported torch and transformers once (start-up in about a third of the time; no "
        "CUDA is initialised before a fork); false starts each as its own interpreter",
    )
    max_log_mib: float = Field(
        100.0,
        ge=0,
        description="each process's log (<run.dir>/logs/<name>.log) stops after this many MiB of log lines, "
        "with one last line saying so (0 = unbounded); output written straight to fd 1/2 (a C library's, a "
        "traceback at exit) is not counted",
    )


class TinyModelConfig(Section):
    hidden_size: int = Field(64, ge=8, description="width of the tiny Llama built when model.init='tiny'")
    num_layers: int = Field(2, ge=1, description="decoder layers")
    num_heads: int = Field(4, ge=1, description="attention heads")
    intermediate_size: int = Field(128, ge=8, description="MLP width")
    alphabet: str = Field(
        "",
        description="characters of the tiny model's character-level tokenizer; '' = every "
        "character that occurs in the task's rows",
    )
    max_positions: int = Field(512, ge=16, description="longest prompt + completion the tiny model takes")


class ModelConfig(Section):
    path: str = Field(
        "", description="local transformers model directory (config, safetensors, tokenizer); '' means <run.dir>/model"
    )
    init: Literal["tiny", "pretrained"] = Field(
        "tiny",
        description="'tiny': build a small Llama and a character tokenizer if the directory does not "
        "exist; 'pretrained': path must exist",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="compute dtype of the engine and the learner, and of published weights "
        "(the learner keeps fp32 master weights and optimizer state)",
    )
    tiny: TinyModelConfig = TinyModelConfig()


BUILTIN_TASKS = ("copy", "reverse", "product")
MAX_TURNS = 1 << 10  # = protocol.messages.MAX_TURNS (a test keeps them equal; numpy stays out of this module)


class TaskConfig(Section):
    type: Literal["copy", "reverse", "product", "dataset"] = Field(
        "copy",
        description="'copy'/'reverse': built-in generated tasks; 'product': the product of two task.length-digit "
        "numbers (with task.environment='calc' the model can call a calculator); 'dataset': rows of task.dataset "
        "(the default whenever task.dataset is set)",
    )
    length: int = Field(
        3,
        ge=1,
        le=32,
        description="copy/reverse: symbols per prompt, the most with min_length; product: digits per factor",
    )
    min_length: int = Field(
        0,
        ge=0,
        le=32,
        description="copy/reverse: 0 = every prompt has exactly `length` "
        "symbols; else each prompt's length is drawn uniformly from min_length..length "
        "(inclusive), so answer lengths vary (to measure length bias)",
    )
    symbols: int = Field(12, ge=2, le=26, description="copy/reverse: alphabet size (letters a..)")
    dataset: str = Field("", description="local JSONL or Parquet file, or a `datasets` save_to_disk directory")
    prompt_field: str = Field(
        "prompt", description="column holding the prompt: a string, or a list of chat messages ({role, content})"
    )
    template: str = Field(
        "",
        description="how a row becomes prompt text: a Python format string over its "
        "columns, e.g. 'Q: {question}\\nA:'; '' = the prompt column as it is",
    )
    chat_template: bool = Field(False, description="render prompts with the tokenizer's chat template")
    system_prompt: str = Field("", description="chat_template only: a system message put before each prompt")
    reward: str | list[str] = Field(
        "",
        description="reward function(s): a built-in name (docs/TASKS.md, 'Built-in rewards'), "
        "'package.module:function' or 'path/file.py:function'; '' = the built-in task's own",
    )
    reward_weights: list[float] = Field([], description="one weight per reward function; [] = all 1.0")
    reward_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a reward call running longer is killed; its rows score 0 (counted as reward/errors/timeout)",
    )
    max_reward_failures: int = Field(
        50,
        ge=0,
        description="a reward function that fails this many calls in a row (most rows raised, timed out, NaN, "
        "outside +-selector.max_abs_reward, ...) stops the rollout server with an error naming it; 0 = never stop",
    )
    stop: list[str] = Field([], description="stop strings: a completion ends after the token that completes one")
    max_prompt_tokens: int = Field(1024, ge=1, description="longer prompts are skipped and counted")
    environment: str = Field(
        "",
        description="multi-turn episodes with tools: a built-in environment ('calc', 'calc_shaped') or "
        "'package.module:Class' / "
        "'path/file.py:Class' (docs/TASKS.md, 'Environments and tools'); '' = single-turn completions",
    )
    max_turns: int = Field(4, ge=1, le=MAX_TURNS, description="environment: model turns per episode at most")
    max_episode_tokens: int = Field(
        0,
        ge=0,
        description="environment: tokens of an episode after its prompt (the model's and the environment's) at "
        "most; 0 = max_turns x max_new_tokens",
    )
    env_timeout_s: float = Field(
        10.0,
        gt=0,
        description="environment: a reset+step call (tools included) running longer is killed; its episode ends "
        "with reward 0 (env/errors/timeout)",
    )
    max_env_chars: int = Field(
        4096,
        ge=1,
        description="environment: new messages of one step longer than this many characters end the episode with "
        "reward 0 (env/errors/too_long)",
    )
    eval_dataset: str = Field("", description="held-out rows for eval (same formats as task.dataset)")
    eval_fraction: float = Field(
        0.0, ge=0, lt=1, description="or hold out this fraction of task.dataset (the same rows on every rollout server)"
    )

    @model_validator(mode="before")
    @classmethod
    def _dataset_implies_type(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("dataset") and "type" not in data:
            return {**data, "type": "dataset"}
        return data

    @model_validator(mode="after")
    def _checks(self) -> TaskConfig:
        if self.type == "dataset" and not self.dataset:
            raise ValueError("task.type='dataset' needs task.dataset=<local .jsonl/.parquet file or datasets dir>")
        if self.type in BUILTIN_TASKS and self.dataset:
            raise ValueError(
                f"task.dataset is set but task.type={self.type!r}: set task.type='dataset' (or leave task.type out)"
            )
        if self.type == "dataset" and not self.reward:
            raise ValueError(
                "a dataset task needs task.reward: a built-in name such as 'math_answer' or "
                "'package.module:function' (docs/TASKS.md)"
            )
        n = len(self.rewards)
        if self.reward_weights and len(self.reward_weights) != n:
            raise ValueError(
                f"task.reward_weights has {len(self.reward_weights)} weights for {n} reward "
                "function(s): give one weight per function, or none"
            )
        if self.eval_dataset and self.eval_fraction:
            raise ValueError("set task.eval_dataset or task.eval_fraction, not both")
        if self.min_length > self.length:
            raise ValueError(
                f"task.min_length={self.min_length} is above task.length={self.length}: set "
                "task.min_length <= task.length (task.length is the longest prompt; "
                "task.min_length=0 for a fixed length)"
            )
        if self.eval_fraction and self.type != "dataset":
            raise ValueError(
                "task.eval_fraction holds out rows of task.dataset; built-in tasks draw eval prompts "
                "from their own generator"
            )
        return self

    @property
    def rewards(self) -> list[str]:
        """The reward functions' specs, the built-in task's own verifier by default."""
        if not self.reward:
            return [self.type]
        return [self.reward] if isinstance(self.reward, str) else list(self.reward)

    @property
    def weights(self) -> list[float]:
        return list(self.reward_weights) or [1.0] * len(self.rewards)

    @property
    def name(self) -> str:
        """What groups carry as their ``task``: the built-in task's type or the dataset's file stem
        (printable ASCII, at most 64 characters); the selector rejects groups of any other task."""
        if self.type in BUILTIN_TASKS:
            return self.type
        return "".join(c if " " <= c <= "~" else "_" for c in Path(self.dataset).stem)[:64]


class EvalConfig(Section):
    every: int = Field(0, ge=0, description="evaluate every this many versions (0 = never)")
    prompts: int = Field(64, ge=1, description="held-out prompts per evaluation")
    temperature: float = Field(0.0, ge=0, description="0 = greedy")
    pass_threshold: float = Field(1.0, description="a completion passes when its reward is >= this (pass@1)")
    server: str = Field("rollout-0", description="the rollout server (--server-id) that runs evaluations")


class EngineConfig(Section):
    type: Literal["torch", "vllm"] = Field("torch", description="generation engine; vllm is an optional extra")
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda', 'cuda:1'")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vllm only")
    lora_mode: Literal["merged", "unmerged"] = Field(
        "merged",
        description="torch engine with learner.lora: 'merged' writes W + B@A*alpha/rank into a private copy of "
        "the base weights per version; 'unmerged' adds the adapter's path in each forward (docs/LORA.md)",
    )


class RolloutConfig(Section):
    servers: int = Field(2, ge=0, description="rollout servers the launcher starts on this machine")
    group_size: int = Field(16, ge=1, description="n: completions sampled per prompt")
    prompts_per_call: int = Field(4, ge=1, description="prompts generated together in one engine call")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (log-probs are of this distribution)")
    max_new_tokens: int = Field(0, ge=0, description="0 = copy/reverse: the answer length + 1; dataset: 256")
    threads: int = Field(1, ge=1, description="torch threads per rollout server")
    heartbeat_s: float = Field(2.0, gt=0, description="heartbeat period to the selector")
    pacing: Literal["credits", "free"] = Field(
        "credits",
        description="'credits': before each engine call a server asks the selector for work, and the "
        "selector grants only what can be trained within max_staleness, sized to the server's measured speed "
        "(docs/ARCHITECTURE.md, 'Pacing'); 'free': generate without asking, stale groups are dropped on arrival "
        "(the behaviour before pacing, kept for comparison)",
    )
    surplus: Literal["idle", "grow_n"] = Field(
        "idle",
        description="pacing: what servers do when they can generate more than the learner trains: "
        "'idle' waits for work; 'grow_n' samples more completions per prompt (up to max_group_size), so the "
        "selector keeps its m from more candidates (PODS)",
    )
    max_group_size: int = Field(0, ge=0, description="surplus='grow_n': the largest n granted; 0 = 4 x group_size")
    http_port: int = Field(
        0,
        ge=0,
        le=65535,
        description="an OpenAI-compatible HTTP endpoint on each rollout server (/v1/models, /v1/completions, "
        "/v1/chat/completions; docs/TASKS.md, 'Driving episodes over HTTP'); 0 = off. Set it in the run's config "
        "file, not for one server: it lets episodes of task.max_turns turns through the selector too",
    )
    http_host: str = Field(
        "127.0.0.1",
        description="address the HTTP endpoint binds; any other than loopback needs rollout.http_tokens_file",
    )
    http_tokens_file: str = Field(
        "",
        description="bearer tokens the HTTP endpoint accepts, one a line ('Authorization: Bearer <token>'); "
        "when set every request needs one, also on loopback; '' = no authentication (loopback only)",
    )
    http_max_open_episodes: int = Field(
        256, ge=1, le=1 << 16, description="HTTP: episodes one client (token) may hold open; more are refused (429)"
    )
    http_episode_timeout_s: float = Field(
        600.0,
        gt=0,
        description="HTTP: an episode group without a request for this long is dropped (http/episodes_dropped/idle)",
    )
    generate: bool = Field(
        True,
        description="false: the server samples nothing of its own task; it loads each new version and serves "
        "its HTTP endpoint only (an external agent program makes every group; needs rollout.http_port)",
    )
    engine: EngineConfig = EngineConfig()

    @model_validator(mode="after")
    def _http_auth(self) -> RolloutConfig:
        if not self.generate and not self.http_port:
            raise ValueError("rollout.generate=false leaves the server nothing to do: set rollout.http_port too")
        if self.http_port and not self.http_tokens_file and not is_loopback(self.http_host):
            raise ValueError(
                f"rollout.http_host={self.http_host!r} is not loopback: set rollout.http_tokens_file=<file of bearer "
                "tokens, one a line> (every client then sends 'Authorization: Bearer <token>')"
            )
        return self


# Literals of names below are the keys of a role's registry (protocol/ imports no role): rule, adv_norm
# and zero_variance those of selector/rules.py, loss.type, loss.aggregation and loss.cov_remedy those of
# learner/losses.py.
# A test beside each registry checks they are equal.
class SelectorConfig(Section):
    rule: Literal["max_variance", "max_reward", "random", "all"] = Field(
        "max_variance", description="down-sampling rule (PODS max_variance; 'all' = plain GRPO)"
    )
    keep: int = Field(4, ge=1, description="m: completions kept per group (ignored by rule='all')")
    zero_variance: Literal["drop", "keep"] = Field(
        "keep",
        description="groups whose kept rewards are all equal: 'keep' (zero advantage) or 'drop' (DAPO); "
        "'drop' starves the learner once the task is solved",
    )
    adv_norm: Literal["std", "mean"] = Field("std", description="(r-mean)/(std+eps), or mean-centred only")
    buffer_groups: int = Field(256, ge=1, description="processed groups held; full buffer = back-pressure")
    peer_timeout_s: float = Field(10.0, gt=0, description="a rollout server silent this long is reported dead")
    max_peers: int = Field(
        256,
        ge=1,
        description="rollout server identities tracked at once; a new one beyond "
        "this is refused (dead peers are forgotten after 10 x peer_timeout_s)",
    )
    peer_groups_per_s: Annotated[float, Field(ge=0)] | Literal["auto"] = Field(
        "auto",
        description="groups one rollout server may deliver a second outside its pacing grants (a burst of 4 s "
        "worth, at least 4 calls); more are rejected as rejected/peer_rate; 'auto': 16 under rollout.pacing="
        "'credits' (a paced server delivers ungranted groups only after a lease expired or a selector restart) "
        "and 1000 under 'free'; 0 = no bound",
    )
    min_logprob: float = Field(
        -100.0,
        lt=0,
        description="a group with a behaviour log-prob below this is rejected "
        "(no sampler draws a token of probability e^-100; such a value would blow up "
        "the importance ratio)",
    )
    max_abs_reward: float = Field(1e4, gt=0, description="a group with a reward outside +-this is rejected")
    lease_s: float = Field(
        5.0,
        gt=0,
        le=3600,
        description="pacing: a grant not delivered within max(lease_s, 4 x "
        "the server's expected call time) expires, and its capacity goes to other servers",
    )
    max_hold_steps: float = Field(
        4.0,
        ge=0,
        description="pacing: a batch waits at most this x the learner's step "
        "time for granted groups whose last chance it is (a slow server's late groups are "
        "trained instead of dropped); 0 = never wait",
    )


class LossSettings(Section):
    type: Literal["grpo_is", "decoupled_ppo", "tis", "m2po", "rec_oneside"] = Field(
        "grpo_is", description="policy loss (docs/LOSSES.md)"
    )
    clip_low: float = Field(0.2, ge=0, lt=1, description="epsilon_low of the clipped ratio")
    clip_high: float = Field(0.28, ge=0, description="epsilon_high (DAPO clip-higher)")
    tis_cap: float = Field(2.0, gt=0, description="C: truncation of the importance weight (tis)")
    behav_cap: float = Field(2.0, gt=0, description="cap on pi_prox/pi_behav (decoupled_ppo)")
    m2_tau: float = Field(0.04, gt=0, description="M2PO second-moment threshold")
    aggregation: Literal["token_mean", "seq_mean_token_mean", "constant"] = Field(
        "token_mean", description="how token losses become one number"
    )
    entropy_coef: float = Field(
        0.0,
        ge=0,
        description="subtract this x the mean entropy of the sampling "
        "distribution over completion tokens from the loss (an entropy bonus against "
        "entropy collapse; docs/LOSSES.md); 0 = off",
    )
    cov_remedy: Literal["none", "clip_cov", "kl_cov"] = Field(
        "none",
        description="entropy remedy on tokens of high covariance between log-prob and advantage (Cui et al. "
        "2025; docs/LOSSES.md): 'clip_cov' detaches the gradient of a random clip_cov_ratio of the tokens whose "
        "covariance lies in (clip_cov_low, clip_cov_high); 'kl_cov' adds kl_cov_coef x |log(pi/pi_behav)| on the "
        "kl_cov_ratio of tokens of largest covariance; 'none' = off",
    )
    clip_cov_ratio: float = Field(
        2e-4, gt=0, le=1, description="clip_cov: fraction of the tokens detached (at least one)"
    )
    clip_cov_low: float = Field(1.0, description="clip_cov: lower bound of the covariance band")
    clip_cov_high: float = Field(5.0, description="clip_cov: upper bound of the covariance band")
    kl_cov_ratio: float = Field(2e-3, gt=0, le=1, description="kl_cov: fraction of the tokens penalised (at least one)")
    kl_cov_coef: float = Field(1.0, ge=0, description="kl_cov: coefficient of the |log-ratio| penalty")

    @model_validator(mode="after")
    def _band(self) -> LossSettings:
        if self.clip_cov_low >= self.clip_cov_high:
            raise ValueError(
                f"learner.loss.clip_cov_low={self.clip_cov_low} must be below clip_cov_high={self.clip_cov_high} "
                "(the covariance band Clip-Cov draws its tokens from)"
            )
        return self


class LoraSettings(Section):
    """LoRA adapters through peft (docs/LORA.md): with ``rank`` > 0 the learner trains only the adapters,
    and a published version is the adapter; every rollout server builds the base from its own model.path."""

    rank: int = Field(0, ge=0, le=4096, description="adapter rank r; 0 = off (full fine-tuning)")
    alpha: int = Field(16, ge=1, le=65536, description="the update is B@A x alpha/rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input while training")
    target_modules: list[str] = Field(
        ["q_proj", "k_proj", "v_proj", "o_proj"],
        min_length=1,
        description="names of the linear modules that get an adapter (the last part of their path)",
    )


class LearnerConfig(Section):
    nproc: int = Field(1, ge=1, description="torchrun ranks (processes) on this machine (on each node)")
    nnodes: int = Field(
        1,
        ge=1,
        description="machines the learner spans: each runs `podsrl learner` with its own learner.node_rank, "
        "and torchrun's c10d rendezvous at learner.rdzv_endpoint joins them into one job (docs/DEPLOY.md)",
    )
    node_rank: int = Field(
        0,
        ge=0,
        description="this machine's place among learner.nnodes (0..nnodes-1); global rank 0, the one that "
        "talks to the selector and publishes weights, is local rank 0 of node 0",
    )
    rdzv_endpoint: str = Field(
        "",
        description="host:port of torchrun's c10d rendezvous for learner.nnodes > 1: node 0's address "
        "and a free port every node reaches (node 0's agent hosts the store)",
    )
    rdzv_id: str = Field(
        "podsrl", min_length=1, description="torchrun --rdzv-id: the same on every node of one learner job"
    )
    rdzv_timeout_s: float = Field(
        900.0,
        gt=0,
        description="torchrun's rendezvous join timeout: how long the nodes wait for each other to start "
        "before the job fails",
    )
    dist_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="gloo/NCCL collective timeout: a rank that stops answering (a frozen node) fails the "
        "others' next collective after this long; a node that dies fails it at once (its connections close)",
    )
    groups_per_step: int = Field(8, ge=1, description="groups per batch (one batch per update and version)")
    lr: float = Field(
        1e-3,
        gt=0,
        description="AdamW learning rate (at 3e-3 half the seeds of the default run "
        "collapse their entropy before reward 0.8: docs/STALENESS.md, 'Runs that fail')",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    grad_clip: float = Field(1.0, ge=0, description="max grad norm; 0 disables")
    checkpoint_every: int = Field(50, ge=0, description="steps between checkpoints; 0 = only at the end")
    threads: int = Field(1, ge=1, description="torch threads per rank")
    device: str = Field("auto", description="'auto' (cuda if available), 'cpu', 'cuda'")
    batch_timeout_s: float = Field(30.0, gt=0, description="re-send a batch request after this long without one")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="'ddp': full replica per rank; 'fsdp': FSDP2, parameters, gradients and optimizer "
        "state sharded per decoder layer",
    )
    micro_batch_tokens: int = Field(
        8192,
        ge=0,
        description="per-rank forward/backward passes hold at most this many padded tokens "
        "(rows x longest prompt+completion), gradients accumulated into one step; 0 = the whole shard at once",
    )
    grad_checkpointing: bool = Field(
        False, description="recompute activations in backward (less memory, ~1.3x compute)"
    )
    warmup_steps: int = Field(0, ge=0, description="linear learning-rate warm-up over this many steps")
    lr_schedule: Literal["constant", "cosine"] = Field(
        "constant", description="after warm-up: constant lr, or cosine decay to lr*min_lr_ratio at run.steps"
    )
    min_lr_ratio: float = Field(0.0, ge=0, le=1, description="cosine schedule: final lr as a fraction of lr")
    ppo_epochs: int = Field(
        1,
        ge=1,
        le=64,
        description="passes over each batch; the update that makes one version takes ppo_epochs x minibatches "
        "optimizer steps, with decoupled_ppo/tis's proximal policy fixed at its start (docs/LOSSES.md)",
    )
    minibatches: int = Field(
        1,
        ge=1,
        description="optimizer steps per pass: each pass cuts the batch into this many minibatches, shuffled "
        "by (run.seed, version, epoch); at most the rows per batch",
    )
    loss: LossSettings = LossSettings()
    lora: LoraSettings = LoraSettings()

    @property
    def world_size(self) -> int:
        """Ranks of the whole learner job: nproc on each of nnodes machines."""
        return self.nproc * self.nnodes

    @model_validator(mode="after")
    def _nodes(self) -> LearnerConfig:
        if self.node_rank >= self.nnodes:
            raise ValueError(
                f"learner.node_rank={self.node_rank} but learner.nnodes={self.nnodes}: node ranks are "
                f"0..{self.nnodes - 1}"
            )
        if self.nnodes > 1:
            host, sep, port = self.rdzv_endpoint.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(
                    f"learner.nnodes={self.nnodes} needs learner.rdzv_endpoint=HOST:PORT (node 0's address "
                    f"and a free port), got {self.rdzv_endpoint!r}"
                )
        return self


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IPs (127.0.0.0/8, ::1); any other name or address is not."""
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


PORT_KEYS = ("group_port", "batch_port", "announce_port", "weights_port")  # one link each
_SELECTOR_PORTS = PORT_KEYS[:2]  # bound on the selector's machine; the others on the learner's


class NetConfig(Section):
    """Ports under `podsrl run`: when the launcher starts every process itself on loopback
    (`rollout.servers` >= 1 and `bind_host`, `selector_host`, `learner_host` all loopback), each
    `*_port` that neither the config file nor an override sets is a free port it picks, so two runs
    on one machine never collide; a port set either way is kept as given, even at its default. The
    launcher prints the ports and writes them to `<run.dir>/config.toml`, the file its processes
    read, with which another rollout server on the machine joins:
    `podsrl rollout --config <run.dir>/config.toml --server-id NAME` (a run started from that file
    keeps its ports). Otherwise, and for a process started alone, the ports are as configured. No two
    links share a port (across the selector's and the learner's only when they run on one machine)."""

    bind_host: str = Field(
        "127.0.0.1", description="address the selector and learner bind ('0.0.0.0' for remote servers)"
    )
    selector_host: str = Field("127.0.0.1", description="where rollout servers and the learner find the selector")
    learner_host: str = Field("127.0.0.1", description="where rollout servers and the selector find the learner")
    group_port: int = Field(
        5555,
        ge=1,
        le=65535,
        description="groups link (selector ROUTER); `podsrl run` picks a free one unless set (above)",
    )
    batch_port: int = Field(
        5556,
        ge=1,
        le=65535,
        description="batches link (selector ROUTER); `podsrl run` picks a free one unless set (above)",
    )
    announce_port: int = Field(
        5557,
        ge=1,
        le=65535,
        description="announce link (learner PUB); `podsrl run` picks a free one unless set (above)",
    )
    weights_port: int = Field(
        5558,
        ge=1,
        le=65535,
        description="weights link (learner ROUTER); `podsrl run` picks a free one unless set (above)",
    )
    group_hwm: int = Field(64, ge=1, description="selector receive queue, in messages")
    max_group_mib: int = Field(16, ge=1, description="a larger group message is rejected and counted")
    max_batch_mib: int = Field(1024, ge=1, description="largest train batch the learner accepts")
    send_timeout_s: float = Field(1.0, gt=0, description="rollout: wait this long for the selector, then retry")
    weights_timeout_s: float = Field(60.0, gt=0, description="rollout: give up a weight fetch after this long")
    auth: Literal["auto", "on", "off"] = Field(
        "auto",
        description="CurveZMQ on every link: 'auto' = on as soon as bind_host, selector_host or "
        "learner_host is not loopback; 'off' logs a warning (docs/RELIABILITY.md)",
    )
    keys_dir: str = Field(
        "",
        description="directory made by `podsrl keys DIR`: this process's key pair, the "
        "servers' public keys and the allowlists (rollout/*.key); required when auth is on",
    )

    @model_validator(mode="after")
    def _one_link_per_port(self) -> NetConfig:
        """Two links on one port would have the second bind fail (or, for a client, reach the wrong
        process). The selector binds group_port and batch_port, the learner announce_port and
        weights_port: across the two only when both run on one machine. 0 would mean a free port."""
        same_machine = self.selector_host == self.learner_host or (
            is_loopback(self.selector_host) and is_loopback(self.learner_host)
        )
        for i, a in enumerate(PORT_KEYS):
            for b in PORT_KEYS[i + 1 :]:
                apart = not same_machine and (a in _SELECTOR_PORTS) != (b in _SELECTOR_PORTS)
                port = getattr(self, a)
                if port and port == getattr(self, b) and not apart:
                    raise ValueError(
                        f"net.{a} and net.{b} are both {port}: two links cannot share a port; give each "
                        "its own (under `podsrl run` on one machine, leave them unset to get free ones)"
                    )
        return self


class WeightsConfig(Section):
    transport: Literal["auto", "net", "shm"] = Field(
        "auto",
        description="how rollout servers get versions: 'auto' = shared memory when on the learner's machine "
        "(same boot id), else the network; 'net' = always the network; 'shm' = like auto, but warn whenever the "
        "segment cannot be used (docs/ARCHITECTURE.md)",
    )
    shm_dir: str = Field(
        "/dev/shm",
        description="learner: where shared-memory segments live (a tmpfs; docker: "
        "raise shm_size); unusable = network only, with a warning",
    )
    keep_versions: int = Field(
        4,
        ge=1,
        description="versions the learner keeps as delta bases (and segments); "
        "each costs one copy of the weights in memory",
    )
    delta: bool = Field(
        True,
        description="send a server the zstd-compressed difference from the version it holds when "
        "the learner still keeps that version, else the full version",
    )
    delta_max_ratio: float = Field(
        0.5,
        gt=0,
        le=1,
        description="a delta larger than this fraction of the version "
        "is not worth its encoding: the learner then sends full versions, and tries a "
        "delta again every 16 versions (fp32 weights at a high lr barely compress)",
    )
    zstd_level: int = Field(1, ge=1, le=22, description="zstd level of deltas (1 is fastest)")
    chunk_mib: float = Field(4.0, gt=0, le=512, description="a transfer travels in chunks of this size")
    window: int = Field(
        4,
        ge=1,
        le=64,
        description="rollout: chunk requests in flight per transfer (flow control: "
        "a slow link holds at most window x chunk_mib at the learner)",
    )
    background: bool = Field(
        True,
        description="rollout: fetch and verify the next version while generating and "
        "swap it in between engine calls; false = stop, fetch, then generate",
    )
    cuda_ipc: bool = Field(
        True,
        description="a learner on CUDA that offers shared memory also shares a device copy of "
        "each version by CUDA IPC, and torch engines on CUDA on its machine load from it "
        "(device-to-device); untested without a GPU (protocol/cuda_ipc.py)",
    )
    pin_s: float = Field(
        30.0,
        ge=0,
        description="learner: a transfer in progress keeps its version (or delta) alive "
        "after it is no longer kept, until this many seconds pass without a request from it; "
        "0 = no pins (a server slower than keep_versions x step time is told 'gone')",
    )
    max_pinned: int = Field(
        2,
        ge=0,
        description="learner: versions no longer kept that transfers in progress may "
        "hold at once, each one more copy of the weights in memory; the oldest pin goes first",
    )


class Config(Section):
    max_staleness: int = Field(2, ge=0, description="K: no sample with learner_version - sample_version > K is trained")
    run: RunConfig = RunConfig()
    model: ModelConfig = ModelConfig()
    task: TaskConfig = TaskConfig()
    eval: EvalConfig = EvalConfig()
    rollout: RolloutConfig = RolloutConfig()
    selector: SelectorConfig = SelectorConfig()
    learner: LearnerConfig = LearnerConfig()
    net: NetConfig = NetConfig()
    weights: WeightsConfig = WeightsConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        if self.selector.rule != "all" and self.selector.keep > self.rollout.group_size:
            raise ValueError(
                f"selector.keep={self.selector.keep} > rollout.group_size={self.rollout.group_size}: "
                "cannot keep more completions than are sampled"
            )
        if self.samples_per_step < self.learner.world_size:
            raise ValueError(
                f"{self.samples_per_step} samples per step cannot feed learner.nproc={self.learner.nproc} x "
                f"learner.nnodes={self.learner.nnodes} ranks: raise learner.groups_per_step"
            )
        if self.rollout.max_group_size and self.rollout.max_group_size < self.rollout.group_size:
            raise ValueError(
                f"rollout.max_group_size={self.rollout.max_group_size} < rollout.group_size="
                f"{self.rollout.group_size}: the group size only grows (or set it to 0 for 4 x group_size)"
            )
        if self.learner.minibatches > self.samples_per_step:
            raise ValueError(
                f"learner.minibatches={self.learner.minibatches} > {self.samples_per_step} rows per batch: "
                "every minibatch needs a row; lower learner.minibatches or raise learner.groups_per_step"
            )
        if self.model.init == "pretrained" and not self.model.path:
            raise ValueError("model.init='pretrained' needs model.path=<local directory>")
        need = (2 * self.max_staleness + 1) * self.learner.groups_per_step
        if self.run.staleness_mode == "exact" and self.selector.buffer_groups < need:
            raise ValueError(
                f"run.staleness_mode='exact' holds up to (2K+1) x groups_per_step = {need} groups: raise "
                f"selector.buffer_groups (now {self.selector.buffer_groups}) to at least {need}"
            )
        return self

    def too_stale(self, learner_version: int, sample_version: Any) -> Any:
        """DESIGN.md's bound, the one definition every role uses: a sample made by ``sample_version``
        (an int or an array of them) is never trained by the update that makes ``learner_version + 1``
        when its staleness ``learner_version - sample_version`` exceeds ``max_staleness``."""
        return learner_version - sample_version > self.max_staleness

    # Derived sizes, computed once here and logged by every process at start-up.
    @property
    def kept_per_group(self) -> int:
        return self.rollout.group_size if self.selector.rule == "all" else self.selector.keep

    @property
    def samples_per_step(self) -> int:
        return self.learner.groups_per_step * self.kept_per_group

    @property
    def max_group_size(self) -> int:
        """The largest n a group may have: rollout.group_size, unless rollout.surplus='grow_n' raises it."""
        if self.rollout.surplus != "grow_n":
            return self.rollout.group_size
        return self.rollout.max_group_size or 4 * self.rollout.group_size

    @property
    def max_new_tokens(self) -> int:
        """Tokens the model samples in one turn (a single-turn completion's length) at most."""
        if self.rollout.max_new_tokens:
            return self.rollout.max_new_tokens
        if self.task.type == "product":  # a tool call holds the expression: 2 x length digits, '*' and two tags
            return 2 * self.task.length + 4
        # copy/reverse: the longest answer (task.length symbols, also with task.min_length) + its stop token
        return self.task.length + 1 if self.task.type in BUILTIN_TASKS else 256

    @property
    def peer_groups_per_s(self) -> float:
        """``selector.peer_groups_per_s``, 'auto' resolved for the run's pacing: 16 under credits (a paced
        server's ungranted groups come only after a lease expired or a selector restart: a call's worth at
        most), 1000 unpaced (the tiny model's server makes ~290 a second)."""
        rate = self.selector.peer_groups_per_s
        if rate != "auto":
            return rate
        return 16.0 if self.rollout.pacing == "credits" else 1000.0

    @property
    def multi_turn(self) -> bool:
        """Groups may be multi-turn episodes: with task.environment, or episodes driven over HTTP."""
        return bool(self.task.environment) or self.rollout.http_port > 0

    @property
    def max_completion_tokens(self) -> int:
        """Tokens after the prompt at most: one turn, or a whole episode (task.environment, rollout.http_port)."""
        if not self.multi_turn:
            return self.max_new_tokens
        return self.task.max_episode_tokens or self.task.max_turns * self.max_new_tokens

    @property
    def max_turns(self) -> int:
        """Model turns of a completion at most: 1 without task.environment or rollout.http_port."""
        return self.task.max_turns if self.multi_turn else 1

    @property
    def model_dir(self) -> Path:
        return Path(self.model.path) if self.model.path else Path(self.run.dir) / "model"

    def summary(self) -> str:
        return (
            f"K={self.max_staleness} n={self.rollout.group_size} m={self.kept_per_group} "
            f"rule={self.selector.rule} groups/step={self.learner.groups_per_step} "
            f"samples/step={self.samples_per_step} loss={self.learner.loss.type} steps={self.run.steps}"
        )


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (["a", "b"], 3); the value is read as TOML, else taken as a string."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not key=value (e.g. learner.lr=1e-3)")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value


def read_toml(path: str | Path, what: str, hint: str = "") -> dict[str, Any]:
    """A TOML file as a dict; ValueError naming ``what`` (and ``hint``) when it is missing or invalid."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist{hint}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"{what} {path} is not valid TOML: {e}") from None


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a TOML run file (or the defaults) and apply dotted overrides; raise ValueError on any error."""
    data: dict[str, Any] = read_toml(path, "config file") if path is not None else {}
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {k} is not a section")
        node[keys[-1]] = value
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        problems = "\n".join(
            f"  {'.'.join(map(str, err['loc'])) or 'config'}: {err['msg']} (got {err['input']!r})" for err in e.errors()
        )
        raise ValueError(
            f"invalid config{f' {path}' if path else ''}:\n{problems}\n"
            "Every key is listed in docs/CONFIG.md (or: podsrl config --reference)."
        ) from None


def to_toml(cfg: Config) -> str:
    """The complete resolved config as TOML, written into the run directory for the record."""
    lines: list[str] = []

    def emit(prefix: str, model: BaseModel) -> None:
        subs = []
        for name, value in model:
            if isinstance(value, BaseModel):
                subs.append((f"{prefix}{name}", value))
            else:
                lines.append(f"{name} = {_toml_value(value)}")
        for sub_name, sub in subs:
            lines.append(f"\n[{sub_name}]")
            emit(f"{sub_name}.", sub)

    emit("", cfg)
    return "\n".join(lines) + "\n"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):  # a JSON string is a TOML basic string once DEL is escaped too
        return json.dumps(v).replace("\x7f", "\\u007f")
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def config_reference() -> str:
    """docs/CONFIG.md's tables, generated from the field descriptions (a test keeps them in sync)."""
    out = [
        "# Configuration reference",
        "",
        "Generated by `podsrl config --reference` from `protocol/config.py`; do not edit by hand.",
        "A run is one TOML file (`configs/tiny.toml` is the default); any key can be overridden on the",
        "command line as `section.key=value`, e.g. `podsrl run max_staleness=0 learner.loss.type=tis`.",
        "Unknown keys and out-of-range values are errors that name the key.",
        "",
    ]

    def table(title: str, model: type[BaseModel]) -> None:
        rows, subs = [], []
        for name, f in model.model_fields.items():
            if isinstance(f.default, BaseModel):
                subs.append((f"{title}.{name}" if title else name, type(f.default)))
                continue
            ops = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
            bounds = ", ".join(
                f"{sym} {getattr(m, op)}" for m in f.metadata for op, sym in ops.items() if hasattr(m, op)
            )
            rows.append(
                f"| `{name}` | `{_toml_value(f.default)}` | {f.description}{f' ({bounds})' if bounds else ''} |"
            )
        if rows:
            out.extend([f"## `[{title}]`" if title else "## top level", ""])
            if model.__doc__:  # a section's own notes (a class without a docstring of its own has None)
                out.extend([inspect.cleandoc(model.__doc__), ""])
            out.extend(["| key | default | meaning |", "|---|---|---|", *rows, ""])
        for sub_title, sub in subs:
            table(sub_title, sub)

    table("", Config)
    return "\n".join(out)
