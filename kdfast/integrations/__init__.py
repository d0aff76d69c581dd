"""Drop-ins for other libraries' distillation losses, with those libraries' conventions."""
