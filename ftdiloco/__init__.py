"""ftdiloco: fault-tolerant DiLoCo training for replica groups that come and go."""
