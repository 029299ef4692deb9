"""The online loop: feedback on served answers -> a reward model -> RL updates -> a guarded redeploy."""
