"""What users run against a serving gradserve: the Python gRPC client (`grpc_client.py`), `gradserve predict`
(`predict.py`), batch jobs over files (`batch.py`, reading and writing files in `batch_io.py`, sending rows in
`batch_transport.py`) and the container's health check (`healthcheck.py`)."""
