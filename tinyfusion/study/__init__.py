"""The study of the paper's claims on digits: measurements, statistics, the report."""
