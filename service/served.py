"""The models /v2 serves, as objects in the KServe manner: a name, versions, readiness, metadata and infer.

    repo = ModelRepository(batcher, proxy, settings); repo.load()     # load() sets each model's `ready`
    model = repo.get("mnist-classifier_A")                             # OwnModel | ProxiedModel | RawUpstream | None
    response = await model.infer(request, headers)                     # preprocess → predict → postprocess

- `OwnModel` `{dataset}-{classifier}` (e.g. `mnist-classifier_A`): our classifier, defended per the request's
  parameters `defense`, `steps`, `restarts`, `seed` (the manifest's default defense when absent); one version, "1".
- `ProxiedModel`, every `protocol: v2` name in `settings.proxy.upstreams`: the image input purified with the dataset's
  generator (same parameters), forwarded to the allow-listed upstream; its answer comes back with the purification's
  parameters added (`purified`, `defense`, `steps`, `restarts`, `purify_ms`, ...). Versions are the upstream's.
- `RawUpstream`, every `protocol: raw` name: TorchServe-style image bytes in, the purified 28×28 PNG forwarded.

Failures are raised as `service.errors.ServiceError`s (`request.RequestError`, `oip.OIPError`,
`imaging.ImageError`, `proxy.UpstreamError`, the batcher's errors), each with its status; the app's one handler
answers them. Nothing here knows HTTP frameworks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from service import imaging, oip
from service.batcher import Batcher
from service.classify import labels_and_probs
from service.config import Settings, Upstream
from service.datasets import DatasetSpec
from service.engine import DefendResult, PurifyResult
from service.metrics import observe_stages
from service.profile import Caller, Gate, Reduced, admit, fix_pipeline, reduce, restricted
from service.proxy import ProxyClient, purify_and_forward
from service.request import Request, Target, check_count, oip_fields, resolve

VERSION = "1"  # the one version of each of our own models
OWN_OUTPUTS = ("probabilities", "labels", "mse", "flagged", "purified")


# -- the request's purification, described -------------------------------------------------------------------------
def described(p: Request, dataset: str, r: PurifyResult | DefendResult | None, images: int) -> dict[str, Any]:
    """Scalar response parameters describing the purification (the protocol's parameters are scalars)."""
    out: dict[str, Any] = {"purified": p.defense != "none", "defense": p.defense, "dataset": dataset,
                           "images": images}  # fmt: skip
    if r is None:  # a proxied name served without purification
        return out
    out |= {"steps": r.steps, "restarts": r.restarts}
    if p.seed is not None:
        out["seed"] = p.seed
    if r.mse is not None:
        out["max_mse"] = float(np.max(r.mse))
    if r.threshold is not None and r.flagged is not None:
        out["detector_threshold"] = float(r.threshold)
        out["flagged"] = int(np.sum(r.flagged))
    elif r.detector_note:
        out["detector_note"] = r.detector_note
    for k, v in r.timings_ms.items():
        out[k] = round(float(v), 3)
    return out


# -- the models ------------------------------------------------------------------------------------------------------
class Model:
    """What /v2 serves under one name (cf. kserve.Model): `load()` sets `ready`; `infer` runs preprocess →
    predict → postprocess."""

    versions: tuple[str, ...] = ()  # () : the model names no versions of its own

    batcher: Batcher  # set by each kind of model; its metrics record the decode stage
    settings: Settings

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready = False
        self.gate: Callable[[], Gate | None] = lambda: None  # the app's per-client defences (set by the repository)

    async def load(self) -> None:
        self.ready = True

    async def is_ready(self) -> bool:
        return self.ready

    async def metadata(self) -> dict[str, Any]:
        raise NotImplementedError

    async def infer(self, req: oip.InferRequest, headers: dict[str, str], decode_ms: float = 0.0,
                    caller: Caller | None = None) -> oip.InferResponse:  # fmt: skip
        """`decode_ms`: what decoding the body took; preprocessing counts to the decode stage too. `caller`: who
        asks (the public profile and the per-client defences apply to it; None: an in-process caller)."""
        t = time.perf_counter()
        public = restricted(caller, self.settings)
        x, ctx = self.preprocess(req, caller)
        if public:
            _public_outputs(req)
        observe_stages(self.batcher.metrics, ctx.model, {"decode": decode_ms + (time.perf_counter() - t) * 1e3})
        out = await self.predict(x, ctx, req, headers, caller)
        if public:
            return self.public_answer(out, req)
        return self.postprocess(out, req, ctx)

    def preprocess(self, req: oip.InferRequest, caller: Caller | None = None) -> tuple[Any, Request]:
        raise NotImplementedError

    async def predict(self, x: Any, p: Request, req: oip.InferRequest, headers: dict[str, str],
                      caller: Caller | None = None) -> Any:  # fmt: skip
        raise NotImplementedError

    def postprocess(self, out: Any, req: oip.InferRequest, p: Request) -> oip.InferResponse:
        raise NotImplementedError

    def public_answer(self, out: Any, req: oip.InferRequest) -> oip.InferResponse:
        """The answer under the public profile: labels and what the output policy allows (`public_outputs`)."""
        raise NotImplementedError

    def reduced_response(self, reduced: Reduced, req: oip.InferRequest, version: str | None) -> oip.InferResponse:
        tensors = {"labels": reduced.labels, "top1": reduced.top1, "probabilities": reduced.probabilities}
        outputs = [oip.Tensor.from_numpy(k, v) for k, v in tensors.items() if v is not None]
        if req.outputs is not None:
            missing = sorted({o.name for o in req.outputs} - {t.name for t in outputs})
            if missing:
                raise oip.OIPError(f"outputs {missing} are not offered by {self.name!r} under the public profile")
            outputs = [t for t in outputs if t.name in {o.name for o in req.outputs}]
        return oip.InferResponse(self.name, outputs, version, req.id, {})


PUBLIC_OUTPUTS = ("labels", "top1", "probabilities")


def _public_outputs(req: oip.InferRequest) -> None:
    """Refuse, before any work, a request for an output the public profile never gives."""
    asked = sorted({o.name for o in req.outputs or []} - set(PUBLIC_OUTPUTS))
    if asked:
        raise oip.OIPError(f"outputs {asked} are not offered under the public profile; outputs: {PUBLIC_OUTPUTS}")


def own_images(t: oip.Tensor, s: Settings, spec: DatasetSpec) -> torch.Tensor:
    """Our models' input for a dataset of C×H×W images: N×C×H×W, N×H×W×C (or N×H×W for one channel); FP16/32/64
    in [0, 1] or UINT8 in [0, 255]."""
    if t.datatype not in ("FP16", "FP32", "FP64", "UINT8"):
        raise oip.OIPError(f"input {t.name!r} must be FP32, FP64, FP16 or UINT8, got {t.datatype}")
    c, h, w = spec.shape
    a = spec.as_nchw(t.data)
    if a is None or a.shape[0] == 0:
        forms = f"N×{c}×{h}×{w}, N×{h}×{w}×{c}" + (f" or N×{h}×{w}" if c == 1 else "")
        raise oip.OIPError(f"input {t.name!r} must have shape {forms}, got {t.shape}")
    check_count(a.shape[0], s, spec)
    x = a.astype(np.float32) / (255.0 if t.datatype == "UINT8" else 1.0)
    if not np.isfinite(x).all() or x.min() < 0 or x.max() > 1:
        raise oip.OIPError(f"input {t.name!r} values must be finite and lie in [0, 1] ([0, 255] for UINT8)")
    return torch.from_numpy(np.ascontiguousarray(x))


class OwnModel(Model):
    """Our classifier `dataset`/`classifier` behind the defense the request names."""

    versions = (VERSION,)

    def __init__(self, dataset: str, classifier: str, batcher: Batcher, settings: Settings,
                 server_ready: Callable[[], bool]) -> None:  # fmt: skip
        super().__init__(f"{dataset}-{classifier}")
        self.dataset, self.classifier = dataset, classifier
        self.batcher, self.settings, self._server_ready = batcher, settings, server_ready

    async def load(self) -> None:
        """Ready once its classifier's ONNX graph is listed (the app's warm-up opens every session)."""
        art = self.batcher.engine.registry.get(f"{self.dataset}/{self.classifier}")
        self.ready = "onnx" in art.files

    async def is_ready(self) -> bool:
        return self.ready and self._server_ready()

    @property
    def spec(self) -> DatasetSpec:
        return self.batcher.engine.registry.spec(self.dataset)

    async def metadata(self) -> dict[str, Any]:
        image = [-1, *self.spec.shape]
        shapes = {"probabilities": ("FP32", [-1, self.spec.num_classes]), "labels": ("INT64", [-1]),
                  "mse": ("FP32", [-1]), "flagged": ("BOOL", [-1]), "purified": ("FP32", image)}  # fmt: skip
        return {
            "name": self.name,
            "versions": list(self.versions),
            "platform": "manifold-guard",
            "inputs": [{"name": "input", "datatype": "FP32", "shape": image}],
            "outputs": [{"name": k, "datatype": d, "shape": sh} for k, (d, sh) in shapes.items()],
        }

    def preprocess(self, req: oip.InferRequest, caller: Caller | None = None) -> tuple[torch.Tensor, Request]:
        if len(req.inputs) != 1:
            raise oip.OIPError(f"model {self.name!r} takes one input tensor, got {len(req.inputs)}")
        x = own_images(req.inputs[0], self.settings, self.spec)
        for o in req.outputs or []:
            if o.name not in (*OWN_OUTPUTS, *PUBLIC_OUTPUTS):
                raise oip.OIPError(f"unknown output {o.name!r}; outputs: {list(OWN_OUTPUTS)}")
        fields = fix_pipeline(oip_fields(dict(req.parameters)), self.name, caller, self.settings)
        return x, resolve(fields, self.settings, self.batcher.engine.registry, Target(self.dataset, self.classifier))

    async def predict(self, x: torch.Tensor, p: Request, req: oip.InferRequest, headers: dict[str, str],
                      caller: Caller | None = None) -> DefendResult:  # fmt: skip
        assert p.classifier is not None
        await admit(self.gate(), caller, x)
        return await self.batcher.defend(x, p.dataset, p.classifier, p.defense, p.cfg, p.seed)

    def public_answer(self, r: DefendResult, req: oip.InferRequest) -> oip.InferResponse:
        return self.reduced_response(reduce(r.probs, r.flagged, self.settings.profile.pipeline(self.name)), req,
                                     VERSION)  # fmt: skip

    def postprocess(self, r: DefendResult, req: oip.InferRequest, p: Request) -> oip.InferResponse:
        wanted = [o.name for o in req.outputs] if req.outputs is not None else None
        tensors = {"probabilities": r.probs.astype(np.float32), "labels": r.labels.astype(np.int64)}
        if r.mse is not None:
            tensors["mse"] = np.asarray(r.mse, dtype=np.float32)
        if r.flagged is not None:
            tensors["flagged"] = np.asarray(r.flagged, dtype=bool)
        if wanted is not None and "purified" in wanted:
            if r.purified is None:
                raise oip.OIPError("output 'purified' needs a defense other than 'none'")
            tensors["purified"] = r.purified.numpy().astype(np.float32)
        missing = [w for w in wanted or [] if w not in tensors]
        if missing:
            raise oip.OIPError(f"outputs {missing} are not produced with defense {p.defense!r}")
        names = wanted if wanted is not None else [k for k in tensors if k != "purified"]
        outputs = [oip.Tensor.from_numpy(k, tensors[k]) for k in names]
        params = {**described(p, self.dataset, r, len(r.labels)), "classifier": self.classifier}
        return oip.InferResponse(self.name, outputs, VERSION, req.id, params)


class ProxiedModel(Model):
    """An allow-listed Open Inference Protocol upstream: purified here, classified there."""

    def __init__(self, name: str, upstream: Upstream, proxy: ProxyClient, batcher: Batcher, settings: Settings
                 ) -> None:  # fmt: skip
        super().__init__(name)
        self.upstream, self.proxy, self.batcher, self.settings = upstream, proxy, batcher, settings

    async def is_ready(self) -> bool:
        return self.ready and await self.proxy.ready(self.name)

    async def metadata(self) -> dict[str, Any]:
        return await self.proxy.metadata(self.name)

    def preprocess(self, req: oip.InferRequest, caller: Caller | None = None) -> tuple[oip.InferRequest, Request]:
        fields = oip_fields(req.parameters)  # our parameters are stripped from what is forwarded
        fields = fix_pipeline(fields, self.name, caller, self.settings)
        p = resolve(fields, self.settings, self.batcher.engine.registry, Target(self.upstream.dataset))
        return req, p

    async def predict(self, req: oip.InferRequest, p: Request, _: oip.InferRequest, headers: dict[str, str],
                      caller: Caller | None = None) -> Proxied:  # fmt: skip
        result: list[PurifyResult] = []

        spec = self.batcher.engine.registry.spec(self.upstream.dataset)

        async def purify(x: torch.Tensor, dataset: str) -> torch.Tensor:
            check_count(x.shape[0], self.settings, spec)
            await admit(self.gate(), caller, x)
            if p.cfg is None:  # defense "none": forwarded as it came
                return x
            r = await self.batcher.purify(x, dataset, p.cfg, p.seed)
            result.append(r)
            return r.images

        fwd = await purify_and_forward(self.proxy, self.name, self.upstream, req, purify, spec, headers)
        return fwd.response, (result[0] if result else None), fwd.images

    def postprocess(self, out: Proxied, req: oip.InferRequest, p: Request) -> oip.InferResponse:
        resp, r, images = out
        resp.parameters.update(described(p, self.upstream.dataset, r, images))
        return resp

    def public_answer(self, out: Proxied, req: oip.InferRequest) -> oip.InferResponse:
        """The upstream's score tensor reduced to what the output policy allows; everything else dropped."""
        resp, r, _ = out
        probs = upstream_probabilities(resp, self.upstream)
        pipeline = self.settings.profile.pipeline(self.name)
        reduced = reduce(probs, None if r is None else r.flagged, pipeline)
        return self.reduced_response(reduced, req, resp.model_version)


Proxied = tuple[oip.InferResponse, PurifyResult | None, int]  # the upstream's answer, the purification, images


def upstream_probabilities(resp: oip.InferResponse, up: Upstream) -> np.ndarray:
    """N×K probabilities from an upstream's answer: its score output (`up.scores_output`, else the first floating
    N×K output), softmaxed when the upstream answers logits (`up.scores`)."""
    named = [t for t in resp.outputs if t.name == up.scores_output] if up.scores_output else []
    floats = [t for t in resp.outputs if t.datatype in ("FP16", "FP32", "FP64") and t.data.ndim == 2]
    found = named or floats
    if not found:
        raise oip.OIPError(f"upstream answered no N×K score tensor (outputs {[t.name for t in resp.outputs]}); "
                           "the public profile needs one to answer", status=502)  # fmt: skip
    scores = found[0].data.astype(np.float32)
    return labels_and_probs(scores)[1] if up.scores == "logits" else scores


class RawUpstream(Model):
    """A TorchServe-style upstream (`protocol: raw`): image bytes in, the purified PNG (the dataset's size and
    channels) forwarded."""

    def __init__(self, name: str, upstream: Upstream, proxy: ProxyClient, batcher: Batcher, settings: Settings
                 ) -> None:  # fmt: skip
        super().__init__(name)
        self.upstream, self.proxy, self.batcher, self.settings = upstream, proxy, batcher, settings

    async def predictions(self, body: bytes, query: dict[str, Any], headers: dict[str, str],
                          caller: Caller | None = None) -> tuple[bytes, str, dict[str, str]]:  # fmt: skip
        """(the upstream's reply, its content type, X-Purification-* headers) for one image's bytes; under the
        public profile the upstream's reply alone (its answer is the upstream's own format: not reduced here)."""
        s = self.settings
        spec = self.batcher.engine.registry.spec(self.upstream.dataset)
        x = imaging.to_tensor(imaging.load_bytes(body, s.max_image_pixels, 1), 1, spec)
        fields = fix_pipeline(oip_fields(query), self.name, caller, s)
        p = resolve(fields, s, self.batcher.engine.registry, Target(self.upstream.dataset))
        if query:
            raise oip.OIPError(f"unknown query parameters {sorted(query)}")
        await admit(self.gate(), caller, x)
        r = None if p.cfg is None else await self.batcher.purify(x, self.upstream.dataset, p.cfg, p.seed)
        png = await asyncio.to_thread(imaging.encode_png, x[0] if r is None else r.images[0])
        content, ctype = await self.proxy.predictions(self.name, png, "image/png", headers)
        if restricted(caller, s):
            return content, ctype, {}
        meta = described(p, self.upstream.dataset, r, 1)
        return content, ctype, {f"X-Purification-{k.replace('_', '-').title()}": str(v) for k, v in meta.items()}


class ModelRepository:
    """Every model /v2 serves, by name: ours from the registry, the proxied ones from the allow-list."""

    def __init__(self, batcher: Batcher, proxy: ProxyClient, settings: Settings,
                 server_ready: Callable[[], bool] = lambda: True,
                 gate: Callable[[], Gate | None] = lambda: None) -> None:  # fmt: skip
        self.server_ready = server_ready  # the engine runs and warm-up finished
        reg = batcher.engine.registry
        pairs = [(ds, clf) for ds in reg.datasets() for clf in reg.classifiers(ds)]
        self.own: dict[str, Model] = {f"{d}-{c}": OwnModel(d, c, batcher, settings, server_ready) for d, c in pairs}
        kinds = {"v2": ProxiedModel, "raw": RawUpstream}
        self.proxied: dict[str, Model] = {n: kinds[u.protocol](n, u, proxy, batcher, settings)
                                          for n, u in settings.proxy.upstreams.items()}  # fmt: skip
        for m in (*self.own.values(), *self.proxied.values()):
            m.gate = gate

    async def load(self) -> None:
        for m in (*self.own.values(), *self.proxied.values()):
            await m.load()

    def get(self, name: str) -> Model | None:
        return self.own.get(name) or self.proxied.get(name)
