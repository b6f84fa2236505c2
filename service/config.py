"""Every setting and server-side cap, read from environment variables (prefix MG_) in one place.

Nested sections use a double underscore: MG_ATTACK__ENABLED=true, MG_PROXY__TIMEOUT_S=5.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal, NamedTuple, get_args

from pydantic import BaseModel, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

ROOT = Path(__file__).resolve().parent.parent
CUDA_BATCH_CAP = 4096  # MG_CUDA_BATCH_SIZE above this is refused at start (its static loops would take ~15 GiB)

# The defenses a call may name, the one list: `service.engine` says what each needs and does, `service.request`
# which a call may use, /v1/models which a dataset offers.
Defense = Literal["none", "defense-gan", "invert-classify", "enhanced-invert-classify", "magnet"]
DEFENSES: tuple[Defense, ...] = get_args(Defense)


class WarmStart(NamedTuple):
    """A projection's L (gradient steps) and R (restarts) from the encoder's estimate E(x)."""

    steps: int
    restarts: int


# The warm start's L and R (Invert-and-Classify): the server's default for the defenses that start from E(x)
# (MG_ENCODER_STEPS, MG_ENCODER_RESTARTS overrides them) and the setting the evaluations measure it at.
WARM_START = WarmStart(steps=25, restarts=1)


class AttackSettings(BaseModel):
    """The dual-use attack endpoints: off unless enabled, then behind an API key."""

    enabled: bool = False
    api_keys: list[str] = Field(default_factory=list, description="accepted values of the X-API-Key header")
    max_iterations: int = 200
    max_restarts: int = 10
    max_eot_samples: int = 16
    max_search_steps: int = 9
    # caps of POST /v1/attack (docs/attacks.md); a request above a cap is refused with 422, never trimmed
    max_projection_steps: int = 200  # projection steps L of the defense an attack runs through
    max_generator_evals: int = 100_000  # per request: attack passes through the defense × L × R (≈ 0.1–1 s per 1k)
    timeout_s: float = 300.0
    adaptive_steps: int = 10  # BPDA/EOT iterations when the caller gives none (EOT: half as many)
    substitute_arch: str = "E"  # the black-box substitute's architecture (E or B)
    substitute_rounds: int = 6  # its substitute-training rounds (150·2^(rounds−1) oracle queries; the paper: 6)


class Upstream(BaseModel):
    """One upstream model server the proxy may forward to (an allow-list entry; no user-supplied URL)."""

    url: str  # base URL, e.g. http://triton:8000 (the proxy appends /v2/models/{model}/infer)
    protocol: Literal["v2", "raw"] = "v2"  # Open Inference Protocol, or TorchServe-style image bytes
    model: str | None = None  # the upstream's model name, default: the proxied name
    input_name: str = "input"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    datatype: Literal["FP32", "UINT8"] = "FP32"
    value_range: Literal[1.0, 255.0] = 1.0  # 1.0 for [0, 1] inputs, 255.0 for [0, 255]
    dataset: str = "mnist"  # whose generator purifies it
    scores: Literal["logits", "probabilities"] = "logits"  # what its score output holds (the public profile's input)
    scores_output: str | None = None  # the score output's name; None: its first floating N×K output
    binary_data: bool = True  # forward tensors with the binary extension (Triton, KServe); False: JSON only
    timeout_s: float | None = None  # this upstream's read timeout; None: proxy.timeout_s


class ProxySettings(BaseModel):
    upstreams: dict[str, Upstream] = Field(default_factory=dict)
    timeout_s: float = 10.0  # read/write/pool timeout of one upstream call
    connect_timeout_s: float = 2.0
    max_connections: int = 64
    max_keepalive_connections: int = 16
    keepalive_expiry_s: float = 30.0
    max_response_bytes: int = 64 * 1024 * 1024  # a larger upstream reply is a 502


class AuditSettings(BaseModel):
    """POST /v1/audits and `python -m service.audit` (docs/audit.md): robustness audits of allow-listed model
    servers, bare and behind the guard, as jobs behind an API key; a request over a cap is refused (422)."""

    api_keys: list[str] = Field(default_factory=list, description="X-API-Key values that may run audits")
    targets: list[str] | None = None  # names an audit may target; None: every proxied upstream (proxy.upstreams)
    max_images: int = 500  # images per audit
    max_queries: int = 2_000_000  # rows sent to the target per audit, every attack and pipeline together
    max_queries_per_image: int = 10_000  # one attack's queries per image
    max_pipelines: int = 3  # guarded pipelines per audit
    max_concurrent: int = 1  # audits run at once; more wait in the queue
    max_queued: int = 8  # audits waiting; more are refused (429)
    max_sample_bytes: int = 8 * 1024 * 1024  # an uploaded sample (.npz or .zip of class folders)
    reports_dir: Path = ROOT / "runs" / "audits"  # finished reports, kept across restarts
    max_reports_bytes: int = 100 * 1024 * 1024  # the oldest reports are removed past this


Output = Literal["label", "top1", "probabilities"]
OnFlagged = Literal["answer", "abstain", "refuse"]


class ServedPipeline(BaseModel):
    """What the public profile serves under one name; a public caller changes none of it."""

    defense: str | None = None  # None: the model's default (the manifest's for our own, defense-gan for a proxy)
    steps: int | None = None  # None: the server's default for the defense's start
    restarts: int | None = None
    output: Output = "top1"  # label | top1 (label and its probability, rounded) | probabilities (all, rounded)
    decimals: int = Field(2, ge=0, le=8)  # rounding of returned probabilities
    on_flagged: OnFlagged = "answer"  # a flagged input: answered as any other, abstained (label -1), or refused


class ProfileSettings(BaseModel):
    """The public profile (MG_PUBLIC=true): each served name's pipeline fixed by the operator, outputs reduced."""

    inspect_keys: list[str] = Field(
        default_factory=list,
        description="X-API-Key values of the inspect scope: "
        "callers that may set defense, steps, restarts and seed and read mse/flagged",
    )
    pipelines: dict[str, ServedPipeline] = Field(
        default_factory=dict,
        description="per served name: a /v2 model name, or a /v1 model (dataset or dataset/classifier)",
    )
    default: ServedPipeline = Field(default_factory=ServedPipeline)

    def pipeline(self, name: str) -> ServedPipeline:
        return self.pipelines.get(name, self.default)


class ClientSettings(BaseModel):
    """Per-client defences: a client is its API key, else its address (X-Forwarded-For only from trusted proxies)."""

    enabled: bool | None = None  # None: on exactly under the public profile
    trusted_proxies: list[str] = Field(
        default_factory=list, description="addresses or CIDRs whose X-Forwarded-For names the client"
    )
    rate_per_s: float = 20.0  # images per second a client may send, sustained (token bucket)
    burst: int = 128  # the bucket's size, in images
    budget: int = 20_000  # images per client per budget window
    budget_window_s: float = 86_400.0
    detector: bool = True  # the stateful query-attack detector (Blacklight-style)
    cooldown_s: float = 3_600.0  # a detected client is refused (429) this long
    # K: matched queries among a client's recent ones that detect it (docs/detectors.md measures 10, 5 and 3)
    detector_matches: int = Field(10, ge=1)
    # memory (bench/guard.py): ≈ 0.8 kB per tracked client plus 261 B per remembered query, 389 B per stream query;
    # at these caps at most ≈ 20,000 × (0.8 kB + 32 × 261 B) + 100,000 × 389 B ≈ 220 MB in-process
    max_clients: int = 20_000  # tracked clients, the least recently seen evicted first
    history: int = 32  # recent queries remembered per client
    stream_history: int = 100_000  # recent queries remembered across all clients


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MG_", env_nested_delimiter="__", extra="ignore")

    models_dir: Path = ROOT / "models"
    device: str = "auto"  # "auto", "cpu", "cuda"
    cuda_graphs: bool = True  # on a GPU: the projection's step loop as CUDA graphs (False: eager kernels)
    torch_threads: int | None = None

    # defaults of a defended call, and their caps
    default_dataset: str = "mnist"
    default_classifier: str | None = None  # None: the manifest's `defaults` (its most robust pipeline)
    # which measured default a call naming no pipeline gets: the most robust at the dataset's standard threat, or
    # under the union of its L∞ and L2 threats where that was measured (models/measured.json, training.robustness)
    default_ranking: Literal["standard", "union"] = "standard"
    default_steps: int = 200
    default_restarts: int = 10
    encoder_steps: int = WARM_START.steps
    encoder_restarts: int = WARM_START.restarts
    max_steps: int = 500
    max_restarts: int = 16
    # per request: images × steps × restarts generator passes (≈ 1 ms each on a 2-core CPU: ≈ 40 s); the default
    # call (1 image, 200 × 10) costs 2,000
    max_request_cost: int = 40_000

    # inputs
    max_upload_bytes: int = 4 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_batch_images: int = 64

    # batching and load
    max_batch_size: int = 32  # images per engine call on CPU
    # on a GPU (service.device.batch_size): throughput grows with the batch up to the device's width
    cuda_batch_size: int = Field(512, ge=1, le=CUDA_BATCH_CAP)
    max_wait_ms: float = 5.0
    max_queue: int = 256  # live requests per lane (fast: undefended; slow: projections)
    request_timeout_s: float = 120.0
    max_fill_ms: float = 50.0  # the adaptive fill window never waits longer than this
    fast_wait_ms: float = 1.0  # the undefended lane's fill window (ONNX batches gain little; latency counts)

    # connections and shutdown
    header_timeout_s: float = 10.0  # a connection whose request headers are incomplete by then is closed
    body_timeout_s: float = 30.0  # a request body that has not fully arrived by then → 408
    keep_alive_s: float = 5.0  # idle keep-alive connections are closed after this
    drain_s: float = 30.0  # on SIGTERM: stop accepting, finish in-flight work up to this long, then exit

    # serving (python -m service; the /v1 API)
    host: str = "127.0.0.1"
    port: int = 8000
    default_defense: Defense | None = None  # None: the manifest's default pipeline (service.engine.default_defense)
    warm_up: bool = True  # run every model once at start-up; /readyz answers 200 after it

    attack: AttackSettings = Field(default_factory=AttackSettings)
    proxy: ProxySettings = Field(default_factory=ProxySettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)

    # the public profile (docs/threat-model.md): off for `python -m service` on loopback, on in docker-compose/deploy
    public: bool = False
    profile: ProfileSettings = Field(default_factory=ProfileSettings)
    clients: ClientSettings = Field(default_factory=ClientSettings)
    state_url: str | None = None  # redis://host:port/db keeps the per-client state there (shared by replicas)

    @property
    def guarded(self) -> bool:
        """Per-client defences on: as set, else exactly under the public profile."""
        return self.public if self.clients.enabled is None else self.clients.enabled


@lru_cache
def get_settings() -> Settings:
    return Settings()
