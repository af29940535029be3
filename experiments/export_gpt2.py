r"""`experiments.export_hf --family=gpt2` (the command's earlier name): writes the run as a GPT-2
checkpoint, or says in one line what GPT-2 cannot express. The same flags (--workdir, --hf_dir,
--step) and output.

  python -m experiments.export_gpt2 --workdir=runs/x --hf_dir=exported/x
"""

from absl import app

from experiments import common, export_hf

main = export_hf.exporter("gpt2")

if __name__ == "__main__":
  app.run(main, flags_parser=common.parse_flags)
