"""silofed.simulations: synthetic business units, scenarios and the local simulation runner."""
