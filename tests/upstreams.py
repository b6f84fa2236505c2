"""Real upstream servers for the proxy's end-to-end tests, each run as its own process on a loopback port.

    python tests/upstreams.py kserve --port P --onnx classifier_A.onnx [--rgb-onnx rgb.onnx]   # KServe ModelServer
    python tests/upstreams.py kserve --port P --onnx shapes/classifier_A.onnx --dataset shapes  # another dataset's
    python tests/upstreams.py faulty --port P                            # a V2 look-alike that is slow or broken
    python tests/upstreams.py raw --port P --onnx classifier_A.onnx      # TorchServe-style POST /predictions/{m}

`kserve` serves the ONNX classifier with the `kserve` package's ModelServer (the server KServe runs in its
predictor pods) under two names with two input contracts: `mnist-nchw` (FP32 N×1×28×28 in [0, 1]) and
`mnist-nhwc-u8` (UINT8 N×28×28×1 in [0, 255]); with `--dataset D` (a classifier of D's images, C×H×W) they are
`D-nchw` (FP32 N×C×H×W) and `D-nhwc-u8` (UINT8 N×H×W×C). Each answers `logits` (FP32 N×K) and `label` (INT64 N);
the classifier is the same, so the two must agree exactly on the same image. With `--rgb-onnx`, a third,
`rgb-nhwc-u8` (UINT8 N×32×32×3, a colour classifier), also answers `received`: the image tensor as it arrived.
`faulty`: /v2/models/slow/infer sleeps `--sleep` seconds then answers; /v2/models/garbage/infer answers 200 with
non-JSON; /v2/models/badshape/infer answers JSON whose data does not match its shape.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
import uuid

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response


def _session(path: str):  # noqa: ANN202
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def serve_kserve(port: int, onnx: str, rgb_onnx: str | None = None, dataset: str = "mnist") -> None:
    sys.argv = sys.argv[:1]  # kserve parses the command line at import time
    import kserve
    from kserve import InferOutput, InferRequest, InferResponse

    class OnnxClassifier(kserve.Model):
        """An ONNX classifier behind one input contract (layout, datatype, range)."""

        def __init__(self, name: str, layout: str, datatype: str, value_range: float, path: str = onnx,
                     echo: bool = False) -> None:  # fmt: skip
            super().__init__(name)
            self.layout, self.datatype, self.value_range, self.echo = layout, datatype, value_range, echo
            self.session = _session(path)
            self.ready = True

        def predict(self, payload: InferRequest, headers: dict | None = None) -> InferResponse:
            t = payload.inputs[0]
            if t.name != "input" or t.datatype != self.datatype:
                want = f"expected input 'input' of {self.datatype}"
                raise kserve.errors.InvalidInput(f"{want}, got {t.name} {t.datatype}")
            raw = t.as_numpy()
            x = raw.astype(np.float32) / self.value_range
            if self.layout == "NHWC":
                x = x.transpose(0, 3, 1, 2)
            logits = self.session.run(None, {"input": np.ascontiguousarray(x)})[0].astype(np.float32)
            binary = payload.use_binary_outputs
            out_l = InferOutput("logits", list(logits.shape), "FP32")
            out_l.set_data_from_numpy(logits, binary_data=binary)
            labels = logits.argmax(1).astype(np.int64)
            out_y = InferOutput("label", list(labels.shape), "INT64")
            out_y.set_data_from_numpy(labels, binary_data=binary)
            outputs = [out_l, out_y]
            if self.echo:
                out_r = InferOutput("received", list(raw.shape), self.datatype)
                out_r.set_data_from_numpy(raw, binary_data=binary)
                outputs.append(out_r)
            return InferResponse(payload.id or str(uuid.uuid4()), self.name, outputs, use_binary_outputs=binary,
                                 parameters={"upstream": "kserve"})  # fmt: skip

    models = [OnnxClassifier(f"{dataset}-nchw", "NCHW", "FP32", 1.0),
              OnnxClassifier(f"{dataset}-nhwc-u8", "NHWC", "UINT8", 255.0)]  # fmt: skip
    if rgb_onnx:
        models.append(OnnxClassifier("rgb-nhwc-u8", "NHWC", "UINT8", 255.0, rgb_onnx, echo=True))
    kserve.ModelServer(http_port=port, grpc_port=0, enable_grpc=False, workers=1).start(models)


def serve_faulty(port: int, sleep_s: float) -> None:
    import asyncio

    import uvicorn

    app = FastAPI()

    @app.get("/v2/health/ready")
    async def ready() -> Response:
        return Response(status_code=200)

    @app.post("/v2/models/{name}/infer")
    async def infer(name: str, request: Request) -> Response:
        await request.body()
        if name == "slow":
            await asyncio.sleep(sleep_s)
            return JSONResponse({"model_name": name, "outputs": []})
        if name == "garbage":
            return Response(b"\x00\x01 this is not JSON <html>", media_type="application/json")
        if name == "badshape":
            return JSONResponse({"model_name": name, "outputs": [{"name": "o", "datatype": "FP32", "shape": [2, 3],
                                                                  "data": [1.0, 2.0]}]})  # fmt: skip
        if name == "error":
            return JSONResponse({"error": "model exploded"}, status_code=500)
        return JSONResponse({"error": f"unknown model {name}"}, status_code=404)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def serve_raw(port: int, onnx: str) -> None:
    import uvicorn
    from PIL import Image

    app = FastAPI()
    session = _session(onnx)

    @app.get("/ping")
    async def ping() -> dict:
        return {"status": "Healthy"}

    @app.post("/predictions/{name}")
    async def predictions(name: str, request: Request) -> JSONResponse:
        body = await request.body()
        if request.headers.get("content-type") != "image/png":
            return JSONResponse({"error": "expected image/png"}, status_code=415)
        im = Image.open(io.BytesIO(body))
        x = np.asarray(im.convert("L"), dtype=np.float32)[None, None] / 255.0
        logits = session.run(None, {"input": x})[0][0]
        return JSONResponse({"model": name, "label": int(logits.argmax()), "size": list(im.size), "mode": im.mode,
                             "pixels": np.asarray(im).reshape(-1).tolist()})  # fmt: skip

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["kserve", "faulty", "raw"])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--onnx")
    p.add_argument("--rgb-onnx")
    p.add_argument("--dataset", default="mnist", help="kserve: the --onnx classifier's dataset, its models' prefix")
    p.add_argument("--sleep", type=float, default=30.0)
    a = p.parse_args()
    print(json.dumps({"started": a.kind, "port": a.port, "t": time.time()}), flush=True)
    if a.kind == "kserve":
        serve_kserve(a.port, a.onnx, a.rgb_onnx, a.dataset)
    elif a.kind == "faulty":
        serve_faulty(a.port, a.sleep)
    else:
        serve_raw(a.port, a.onnx)


if __name__ == "__main__":
    main()
