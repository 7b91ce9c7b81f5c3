"""The five stages, in order: data_validation → preprocessing → training → adapter → evaluation."""
