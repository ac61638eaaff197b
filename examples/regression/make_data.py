"""Write scikit-learn's diabetes set as a CSV a user could have: ten named feature columns and the disease
progression one year later in `progression`; and rows.csv, five rows to predict (with ids, without the target).

    python make_data.py            # writes data/diabetes.csv and rows.csv
"""

import csv
from pathlib import Path

from sklearn.datasets import load_diabetes

HERE = Path(__file__).resolve().parent


def main() -> None:
    data = load_diabetes()
    (HERE / "data").mkdir(exist_ok=True)
    with (HERE / "data" / "diabetes.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*data.feature_names, "progression"])
        for row, target in zip(data.data, data.target, strict=True):
            writer.writerow([*(f"{v:.6g}" for v in row), f"{target:g}"])
    with (HERE / "rows.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *data.feature_names])
        for i in range(5):
            writer.writerow([f"patient-{i}", *(f"{v:.6g}" for v in data.data[i])])
    print(f"wrote {HERE / 'data' / 'diabetes.csv'} ({len(data.data)} rows) and {HERE / 'rows.csv'}")


if __name__ == "__main__":
    main()
