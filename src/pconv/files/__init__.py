"""pconv's files: the format and its validated description (format), save and load of SNNs and calibrations
(export), and atomic writes that survive Ctrl-C and SIGTERM (atomic)."""
