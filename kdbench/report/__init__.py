"""Reports: MLflow runs -> pandas (runs) -> cells and statistics (cells, stats) -> tables and figures
(tables, format, paper, figures, curves), written by `write`. Never trains.
"""
