r"""`experiments.import_hf` for GPT-2 checkpoints only (the command's earlier name): any other
architecture is refused. The same flags (--hf_dir, --workdir) and output.

  python -m experiments.import_gpt2 --hf_dir=/models/gpt2 --workdir=runs/gpt2
"""

from absl import app

from experiments import common, import_hf

main = import_hf.importer(expect="gpt2")

if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
