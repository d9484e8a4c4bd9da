"""Coverage-guided fuzzing of the parsers that meet hostile input (issue 12).

``targets`` holds one plain function per parser, importable without atheris: ``make test``
replays ``corpus/<target>/`` and ``crashes/<target>/`` through them. ``driver`` runs one target
under atheris; ``campaign`` (``make fuzz``) runs every target for a fixed time.
"""
