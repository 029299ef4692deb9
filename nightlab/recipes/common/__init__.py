"""What the recipes share: chat formats, budget forcing, problems and teachers, RL environments, the client's
view of the service, plots, how a setting is declared (`settings`) and the builder that turns a recipe's
settings model into command-line options (`cli_options`)."""
