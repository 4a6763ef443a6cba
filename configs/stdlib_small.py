# The embedded default job (`jaxgpt train` with no arguments): a 4-layer, 128-wide byte-level GPT
# on the source of the installed Python standard library, prepared on first use. The schema's
# defaults are this job, so there is nothing to override; the file exists to be copied.
overrides = {}
