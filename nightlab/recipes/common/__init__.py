"""What the recipes share: chat formats, budget forcing, problems and teachers, RL environments, the client's
view of the service, plots, and the CLI builder that turns a recipe's settings model into options."""
