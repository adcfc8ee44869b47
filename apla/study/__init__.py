"""The ablation study (a project that uses the library): Tune-A-Video against APLA and its ablations over the
shapes-world benchmark clips. See README.md beside this file."""
