"""The checkpoint programs: `dpjax-convert` (HF or GGUF -> dpjax) and `dpjax-export`
(kept blocks -> an HF checkpoint). The library code they run lives in
`dpjax.checkpoints`, below the model, so that loading a model never imports a
program."""
