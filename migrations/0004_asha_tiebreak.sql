-- ASHA breaks ties of the objective at a rung with the trial's evaluation
-- loss at the same step (lower ranks ahead); NULL when the trial reported
-- none or the objective is the loss itself.
ALTER TABLE asha_decisions ADD COLUMN tiebreak double precision;
