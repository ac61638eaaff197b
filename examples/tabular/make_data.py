"""Write scikit-learn's breast-cancer set as a CSV a user could have: 30 named feature columns and a
`diagnosis` column holding the class names (malignant, benign); and rows.csv, five rows to predict (with ids,
without the label).

    python make_data.py            # writes data/breast_cancer.csv and rows.csv
"""

import csv
from pathlib import Path

from sklearn.datasets import load_breast_cancer

HERE = Path(__file__).resolve().parent


def main() -> None:
    data = load_breast_cancer()
    (HERE / "data").mkdir(exist_ok=True)
    header = [*data.feature_names, "diagnosis"]
    with (HERE / "data" / "breast_cancer.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row, target in zip(data.data, data.target, strict=True):
            writer.writerow([*(f"{v:g}" for v in row), data.target_names[target]])
    with (HERE / "rows.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *data.feature_names])
        for i in (0, 1, 19, 20, 21):
            writer.writerow([f"patient-{i}", *(f"{v:g}" for v in data.data[i])])
    print(f"wrote {HERE / 'data' / 'breast_cancer.csv'} ({len(data.data)} rows) and {HERE / 'rows.csv'}")


if __name__ == "__main__":
    main()
