"""The recipe: its schema (`schema`), loading with `--set` overrides and file checks (`load`), the
`--dry-run` cost estimate (`dry_run`) and `align recipe` commands (`cli`)."""
