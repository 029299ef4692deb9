"""Result sharing across machines: a hub server, its client, and the hardware calibration that makes results
from different machines comparable."""
