"""Predict image files with tritonclient's gRPC client, unchanged: the files travel as the `image` input, BYTES,
one encoded PNG/JPEG per element (the Open Inference Protocol's own encoding of bytes).

    python predict_triton.py 127.0.0.1:8001 samples/zero.png [more.png ...] [--model digits-rgb] [--token T]
"""

import argparse
import os
from pathlib import Path

import numpy as np
import tritonclient.grpc as triton


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("address", help="the front door's gRPC host:port")
    parser.add_argument("files", nargs="+", help="image files")
    parser.add_argument("--model", default="digits-rgb")
    parser.add_argument("--token", default=os.environ.get("GRADSERVE_TOKEN"), help="bearer token, if one is needed")
    args = parser.parse_args()
    client = triton.InferenceServerClient(args.address)
    files = np.array([Path(path).read_bytes() for path in args.files], dtype=np.object_)
    image = triton.InferInput("image", [len(files)], "BYTES")
    image.set_data_from_numpy(files)
    outputs = [triton.InferRequestedOutput("class_name"), triton.InferRequestedOutput("probabilities")]
    headers = {"authorization": f"Bearer {args.token}"} if args.token else None
    result = client.infer(args.model, [image], outputs=outputs, headers=headers, client_timeout=30)
    for path, name, probabilities in zip(args.files, result.as_numpy("class_name"), result.as_numpy("probabilities"),
                                         strict=True):
        print(f"{path}: {name.decode()} ({probabilities.max():.3f})")


if __name__ == "__main__":
    main()
