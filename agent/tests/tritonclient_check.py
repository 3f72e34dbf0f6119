"""Drives the agent's inference API with the stock tritonclient HTTP client, unchanged.

Called by agent/tests/api.rs with one JSON argument: url, model, version, shape and x (the input
values, flat). Prints JSON: the output `y` as received with binary transfer (tritonclient's
default) and with JSON transfer, and its shape. Any protocol disagreement raises and exits non-zero.
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient


def main():
    case = json.loads(sys.argv[1])
    client = httpclient.InferenceServerClient(url=case["url"])
    assert client.is_server_live(), "server not live"
    assert client.is_server_ready(), "server not ready"
    assert client.is_model_ready(case["model"]), "model not ready"
    assert client.is_model_ready(case["model"], case["version"]), "version not ready"
    assert not client.is_model_ready("no-such-model"), "unknown model reported ready"

    metadata = client.get_model_metadata(case["model"])
    assert metadata["versions"] == [case["version"]], metadata
    x_meta = metadata["inputs"][0]
    assert x_meta["datatype"] == "FP32" and x_meta["shape"][0] == -1, metadata
    server = client.get_server_metadata()
    assert server["name"] == "outpost-agent", server
    index = client.get_model_repository_index()
    assert index == [{"name": case["model"], "version": case["version"], "state": "READY"}], index

    x = np.array(case["x"], dtype=np.float32).reshape(case["shape"])
    results = {}
    for mode, binary in (("binary", True), ("json", False)):
        infer_input = httpclient.InferInput(x_meta["name"], list(x.shape), "FP32")
        infer_input.set_data_from_numpy(x, binary_data=binary)
        output = httpclient.InferRequestedOutput("y", binary_data=binary)
        result = client.infer(
            case["model"], [infer_input], model_version=case["version"], outputs=[output]
        )
        y = result.as_numpy("y")
        assert y.dtype == np.float32, y.dtype
        results[mode] = y.reshape(-1).tolist()
        results["shape"] = list(y.shape)

    # All defaults: binary inputs, no outputs named (the client then asks for binary outputs).
    infer_input = httpclient.InferInput("x", list(x.shape), "FP32")
    infer_input.set_data_from_numpy(x)
    y = client.infer(case["model"], [infer_input]).as_numpy("y")
    assert y.reshape(-1).tolist() == results["binary"], "default transfer disagrees"

    try:
        client.infer(case["model"], [infer_input], model_version="999")
        raise AssertionError("inference on a version that is not loaded succeeded")
    except httpclient.InferenceServerException as error:
        assert "999" in error.message(), error

    client.close()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
