"""An HSM-backed signing service with memory-hygiene guarantees."""

__version__ = "0.1.0"
