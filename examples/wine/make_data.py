"""Write scikit-learn's wine set as a CSV a user could have: 13 named chemical measurements and a `cultivar`
column holding the class names (barolo, grignolino, barbera: the three cultivars of the original study); and
rows.csv, three rows to predict (with ids, without the label).

    python make_data.py            # writes data/wine.csv and rows.csv
"""

import csv
from pathlib import Path

from sklearn.datasets import load_wine

HERE = Path(__file__).resolve().parent
CULTIVARS = ("barolo", "grignolino", "barbera")  # class_0, class_1, class_2 of scikit-learn's copy


def main() -> None:
    data = load_wine()
    (HERE / "data").mkdir(exist_ok=True)
    with (HERE / "data" / "wine.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*data.feature_names, "cultivar"])
        for row, target in zip(data.data, data.target, strict=True):
            writer.writerow([*(f"{v:g}" for v in row), CULTIVARS[target]])
    with (HERE / "rows.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", *data.feature_names])
        for i in (0, 70, 150):
            writer.writerow([f"wine-{i}", *(f"{v:g}" for v in data.data[i])])
    print(f"wrote {HERE / 'data' / 'wine.csv'} ({len(data.data)} rows) and {HERE / 'rows.csv'}")


if __name__ == "__main__":
    main()
